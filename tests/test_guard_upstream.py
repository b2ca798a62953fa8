"""What the worker does not inherit from cosmos_guardrail's blocklist (docs/safety_worker.md, "What we do not
inherit from upstream"), proven on the real upstream code and word lists of the tiny checkpoint.

cosmos_guardrail 0.3.2 censors blocklist matches with `*` and then blocks any text whose censored form has a
`*`, so every text that already has one is blocked. The worker's blocklist stage
(`safety_worker.server.blocklist_is_safe`) blocks exactly the texts whose words the lists match. Both directions
are shown in-process against upstream's own `Blocklist.is_safe`, and then where users meet the guard: the
`check` command line, the training data path and the server's answer check.
"""
import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from safety_worker import SafetyClient
from safety_worker.tiny import BLOCKLIST_WORD, EXACT_MATCH_WORD, SAFE_EXAMPLE, WHITELIST_WORD

from fixtures_worker import REPO_ROOT

# Texts with `*` (arithmetic, markdown emphasis and bullets) and no blocklisted word: upstream blocks them all.
STAR_TEXTS = [
    "What is 2*3?",
    "Describe the **red** square",
    "The square moves *left*.\n\n* it starts at the top\n* it ends at the bottom",
    "**Answer:** the arrow points up; 3 * 4 = 12, and 2**8 = 256.",
    "*",
    "***",
]
# The blocklist's words with `*`, markdown, quotes or punctuation around them: blocked, as the bare words are.
WRAPPED_WORDS = [
    f"**{BLOCKLIST_WORD}**", f"*{BLOCKLIST_WORD}*", f"{BLOCKLIST_WORD}*", f"The answer is **{BLOCKLIST_WORD}**.",
    f"* {BLOCKLIST_WORD}", f"2*{BLOCKLIST_WORD}", f'"{BLOCKLIST_WORD}"', f"({BLOCKLIST_WORD})", f"{BLOCKLIST_WORD}!",
    f"**{EXACT_MATCH_WORD}**", f"the *{EXACT_MATCH_WORD}s* sing",
    # better-profanity's leetspeak, where `*` stands for a vowel, still matches: the word reads as letters too
    BLOCKLIST_WORD.replace("o", "*"),
]
# Neither `*`, `@`, `$`, quotes nor non-ASCII: the texts upstream's blocklist reads as intended.
PLAIN_TEXTS = [
    SAFE_EXAMPLE, BLOCKLIST_WORD, f"a {BLOCKLIST_WORD} on the table", f"A {BLOCKLIST_WORD.upper()}, twice!",
    f"the {EXACT_MATCH_WORD} sings", f"{EXACT_MATCH_WORD}s everywhere", BLOCKLIST_WORD.replace("l", "1"),
    f"the {WHITELIST_WORD} is in bloom", "Which way does the square move? Up, down, left or right.", " ",
    "line one\n\nline two", f"the {BLOCKLIST_WORD}es", "the dogs chase balls",
]

# Non-ASCII letters that upstream's `to_ascii` turns into spaces: an accent, full-width letters, a Cyrillic "o".
DISGUISED = [BLOCKLIST_WORD.replace("a", "\u00e1"), "".join(chr(ord(c) + 0xfee0) for c in BLOCKLIST_WORD),
             BLOCKLIST_WORD.replace("o", "\u043e")]

# The blocklist word split by a space ("zor blax"), which better-profanity joins back, then a whitelisted word.
ACROSS_WORDS = f"{BLOCKLIST_WORD[:3]} {BLOCKLIST_WORD[3:]} {WHITELIST_WORD}"

# The worker's own censor mark (U+2588) in the text: upstream's `to_ascii` makes it a space before censoring.
MARKED = ["\u2588\u2588\u2588\u2588 80%", f"\u2588\u2588 {BLOCKLIST_WORD} \u2588\u2588"]

ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT))


@pytest.fixture(scope="module")
def verdicts(run_in_checker_process):
    """(upstream, ours) verdicts of each text below, from one process holding the real checker."""
    texts = STAR_TEXTS + WRAPPED_WORDS + PLAIN_TEXTS + [
        ACROSS_WORDS, "", *DISGUISED, *MARKED]
    return run_in_checker_process(f"""
        from safety_worker.server import blocklist_is_safe
        blocklist = checker.text_guardrail.safety_models[0]
        assert type(blocklist).__name__ == "Blocklist"
        def upstream(text):
            try:
                return list(blocklist.is_safe(text))
            except Exception as e:
                return ["raised", type(e).__name__]
        out = {{t: [upstream(t), list(blocklist_is_safe(blocklist, t))] for t in {texts!r}}}
        # A blank line in the exact-match list (a stray newline in a word file) makes upstream block everything.
        blocklist.exact_match_words.append("")
        safe_example = {SAFE_EXAMPLE!r}
        out["blank exact-match line"] = [upstream(safe_example), list(blocklist_is_safe(blocklist, safe_example))]
        print(json.dumps(out))
    """)


@pytest.mark.parametrize("text", STAR_TEXTS)
def test_texts_with_asterisks_pass_the_blocklist_that_upstream_blocks(verdicts, text):
    upstream, ours = verdicts[text]
    assert upstream[0] is False and "Prompt blocked by censorship" in upstream[1], \
        "upstream no longer blocks texts with '*': update docs/safety_worker.md"
    assert ours == [True, "Input is safe"]


@pytest.mark.parametrize("text", WRAPPED_WORDS)
def test_blocklisted_words_are_blocked_whatever_surrounds_them(verdicts, text):
    _, ours = verdicts[text]
    assert ours[0] is False and "Prompt blocked by" in ours[1]


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_where_upstream_is_not_fooled_the_verdict_and_message_are_upstreams(verdicts, text):
    upstream, ours = verdicts[text]
    assert ours == upstream


def test_the_plain_texts_cover_both_verdicts(verdicts):
    assert {verdicts[t][1][0] for t in PLAIN_TEXTS} == {True, False}


def test_a_match_across_words_is_blocked_not_a_guard_error(verdicts):
    """Better-profanity joins the two parts into the listed word; upstream's whitelist step then pairs the
    censored words with the text's by position and raises (the worker would call it a guard fault)."""
    upstream, ours = verdicts[ACROSS_WORDS]
    assert upstream == ["raised", "IndexError"]
    assert ours == [False, f"Prompt blocked by censorship: Censored Prompt: **** {WHITELIST_WORD}"]


@pytest.mark.parametrize("text", DISGUISED)
def test_accents_full_width_and_cyrillic_look_alikes_do_not_hide_a_word(verdicts, text):
    upstream, ours = verdicts[text]
    assert upstream[0] is True and ours[0] is False  # upstream turned the letters into spaces


def test_look_alikes_are_read_as_latin_only_inside_words_with_latin_letters():
    from safety_worker.server import _ascii_folded

    cyrillic_cop, mixed_cop = "\u0441\u043e\u0440", "\u0441op"  # Russian "litter"; "cop" with a Cyrillic "c"
    assert _ascii_folded(f"{cyrillic_cop} {mixed_cop} caf\u00e9 \ufb01ne") == f"{cyrillic_cop} cop cafe fine"


def test_a_text_with_the_workers_censor_mark_in_it_is_read_like_any_other(verdicts):
    assert [verdicts[t][1][0] for t in MARKED] == [True, False]


def test_an_empty_text_has_no_word_to_block_and_a_blank_list_line_is_no_word(verdicts):
    assert verdicts[""] == [[False, "Input is empty"], [True, "Input is safe"]]
    upstream, ours = verdicts["blank exact-match line"]
    assert upstream[0] is False and "Exact Match Word: " in upstream[1]
    assert ours == [True, "Input is safe"]


# ------------------------------------------------------------------ where users meet it, through a real worker

def _check_cli(endpoint, text):
    proc = subprocess.run([sys.executable, "-m", "safety_worker", "check", "--endpoint", endpoint, "--text", text],
                          capture_output=True, text=True, env=ENV, timeout=60, cwd=str(REPO_ROOT))
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.parametrize("text", ["What is 2*3?", "Describe the **red** square"])
def test_check_command_passes_texts_with_asterisks(tiny_safety_worker, text):
    assert _check_cli(tiny_safety_worker.endpoint, text) == (0, {"input": "text", "safe": True, "reason": "safe"})


def test_check_command_blocks_a_blocklisted_word_in_bold(tiny_safety_worker):
    code, out = _check_cli(tiny_safety_worker.endpoint, f"Describe the **{BLOCKLIST_WORD}**")
    assert code == 1 and not out["safe"] and out["reason"].startswith("BLOCKLIST: Prompt blocked by censorship")


def test_one_batch_of_texts_gets_the_verdicts_each_gets_alone(tiny_safety_worker):
    texts = STAR_TEXTS + WRAPPED_WORDS
    with SafetyClient(tiny_safety_worker.endpoint, timeout=60) as client:
        together = client.check_text(texts)
        alone = [client.check_text(t) for t in texts]
    assert [(v.safe, v.reason) for v in together] == [(v.safe, v.reason) for v in alone]
    assert [v.safe for v in together] == [True] * len(STAR_TEXTS) + [False] * len(WRAPPED_WORDS)


def _with_user_text(sample, text):
    user, *rest = sample["messages"]
    content = [item if item.get("type") != "text" else {"type": "text", "text": text} for item in user["content"]]
    return {**sample, "messages": [{**user, "content": content}, *rest]}


def test_training_trains_on_texts_with_asterisks_and_ledgers_a_bold_blocklisted_word(tmp_path, tiny_safety_worker):
    from theworld.data.safety_filter import SafetyFilter
    from theworld.data.synthetic import SyntheticWorldTask

    task = SyntheticWorldTask(size=4)
    texts = ["What is 2*3?", "Which way does the **red** square move?\n* up\n* down", f"Is it a **{BLOCKLIST_WORD}**?",
             "Answer with *one* word."]
    samples = [_with_user_text(task[i], text) for i, text in enumerate(texts)]
    with SafetyClient(tiny_safety_worker.endpoint) as client:
        filtered = SafetyFilter(client, enumerate(samples), window=4, output_dir=tmp_path)
        trained = [sample["id"] for _, sample in filtered]
        filtered.close()
    assert trained == [samples[i]["id"] for i in (0, 1, 3)]
    blocked = [json.loads(line) for line in (tmp_path / "blocked.jsonl").read_text().splitlines()]
    assert [b["id"] for b in blocked] == [samples[2]["id"]] and "BLOCKLIST" in blocked[0]["reason"]
    assert (filtered.counts.passed, filtered.counts.blocked, filtered.counts.errors) == (3, 1, 0)


def test_server_does_not_refuse_a_markdown_answer_and_refuses_a_blocklisted_one(tiny_safety_worker):
    """`theworld.inference.guard.Guard.check_text` is how the guarded pipeline checks each model answer (inference/pipeline.py)."""
    from theworld.inference.guard import Guard

    markdown = "The square moves **left**.\n\n* It starts on the right.\n* It ends on the left.\n\n2*3 = 6"
    guard = Guard(tiny_safety_worker.endpoint)
    try:
        deadline = time.monotonic() + 60
        answer = asyncio.run(guard.check_text(markdown, deadline))
        refused = asyncio.run(guard.check_text(f"It is a **{BLOCKLIST_WORD}**.", deadline))
    finally:
        guard.close()
    assert answer.safe and answer.stage is None
    assert not refused.safe and refused.stage == "text" and refused.reason.startswith("BLOCKLIST")
