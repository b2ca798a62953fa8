"""A tiny, deterministic guardrail checkpoint in the exact hub-cache layout `cosmos_guardrail` reads.

`cosmos_guardrail.CosmosSafetyChecker` downloads two repositories with `huggingface_hub`:
`nvidia/Cosmos-1.0-Guardrail` (blocklist word files + NLTK data, and the RetinaFace weights
`face_blur_filter/Resnet50_Final.pth`) and `Qwen/Qwen3Guard-Gen-0.6B` (a causal LM that answers
`Safety: Safe|Unsafe|Controversial`). This module writes both into a local hub cache
(`<home>/hub/models--<org>--<name>/{refs/main, snapshots/<rev>/...}`, plain files) so that with
`HF_HOME=<home>` and `HF_HUB_OFFLINE=1` the *real* checker code runs with no network.

The weights are hand-set, not trained, so every verdict is known in advance:

- Text guard (tiny Qwen3Guard): one attention layer with zero queries/keys attends uniformly to the
  whole prompt and counts trigger tokens (each trigger phrase is one added token). The first answer
  token is `Safety: Unsafe ...` if `BLOCKED_PHRASE` occurs, `Safety: Controversial` for
  `CONTROVERSIAL_PHRASE`, an answer with no label for `UNPARSEABLE_PHRASE`, else `Safety: Safe`;
  then end-of-sequence.
- Blocklist: `BLOCKLIST_WORD` in the custom list, `EXACT_MATCH_WORD` in the exact-match list.
- Face filter (RetinaFace-ResNet50): only the detection heads are stored; their weights are zero,
  so outputs do not depend on the (random, unstored) backbone. Box regression is zero (boxes are
  the anchor priors) and the class bias decides: `faces="none"` finds no face (frames unchanged),
  `faces="all"` finds faces everywhere (every frame deterministically pixelated).

This module imports torch/transformers only inside the builders and never imports
`cosmos_guardrail` or `retinaface`; building does not touch autograd.

`python -m safety_worker.tiny OUTDIR [--faces none|all]` builds one variant and prints its
`HF_HOME` directory.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

GUARDRAIL_REPO = "nvidia/Cosmos-1.0-Guardrail"
TEXT_GUARD_REPO = "Qwen/Qwen3Guard-Gen-0.6B"  # cosmos_guardrail hard-codes this id

# Phrases with known verdicts on the tiny checkpoint (case-sensitive: each is one tokenizer token).
BLOCKED_PHRASE = "detonate the blue orchid"
"""The tiny text guard answers `Safety: Unsafe` for any prompt containing this phrase."""
SAFE_EXAMPLE = "A red ball rolls slowly across a wooden table."
"""A prompt every tiny variant passes."""
CONTROVERSIAL_PHRASE = "debate the grey orchid"
"""The tiny text guard answers `Safety: Controversial` (blocked by the worker's default policy)."""
UNPARSEABLE_PHRASE = "confuse the green orchid"
"""The tiny text guard answers with no `Safety:` label: cosmos_guardrail treats that as safe, the
worker fails closed."""
BLOCKLIST_WORD = "zorblax"
"""In the blocklist's custom word list (better-profanity censoring)."""
EXACT_MATCH_WORD = "glimmerquat"
"""In the blocklist's exact-match list."""
WHITELIST_WORD = "orchid"

FACE_VARIANTS = ("none", "all")

# Bump when anything written below changes: it is part of the cache key and the revision.
_BUILDER_VERSION = 1

# Tiny Qwen3Guard answers, one added token each (the regexes in cosmos_guardrail parse these).
_ANSWER_SAFE = "Safety: Safe"
_TRIGGER_ANSWERS = (
    (BLOCKED_PHRASE, "Safety: Unsafe\nCategories: Violent Crimes."),
    (CONTROVERSIAL_PHRASE, "Safety: Controversial\nCategories: Hate."),
    (UNPARSEABLE_PHRASE, "I am not able to classify this request."),
)
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# The real Qwen3Guard template always ends with the assistant header, so does this one.
_CHAT_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{%- endfor %}<|im_start|>assistant\n"
)

# Minimal WordNet 3.0 (the lemmatizer reads lexnames, index.*, *.exc, index.sense, data.adj header).
_WORDNET_HEADER = "  1 This file is a minimal WordNet 3.0 Copyright 2006 by Princeton University stand-in.\n"
_WORDNET_NOUNS = ("ball", "dog", "table", "church", "orchid", "frame", "video", "person")
_PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


def default_tiny_dir() -> Path:
    """Cache root for built variants: env SAFETY_WORKER_TINY_DIR, else ~/.cache/theworld/safety-tiny."""
    env = os.environ.get("SAFETY_WORKER_TINY_DIR")
    return Path(env) if env else Path.home() / ".cache" / "theworld" / "safety-tiny"


def variant_key(faces: str) -> str:
    """Stable name of one variant's directory (also its snapshot revision seed)."""
    if faces not in FACE_VARIANTS:
        raise ValueError(f"faces must be one of {FACE_VARIANTS}, got {faces!r}")
    spec = json.dumps({"builder": _BUILDER_VERSION, "faces": faces}, sort_keys=True)
    return f"faces-{faces}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


def build_tiny_guardrail(root: str | os.PathLike | None = None, faces: str = "none") -> Path:
    """Build (once) the tiny guardrail hub cache for a face variant and return its HF_HOME dir.

    Deterministic; skips work if already built; safe against concurrent builders (each builds in a
    private temp dir and publishes with an atomic rename; the loser discards its copy).
    """
    root = Path(root) if root is not None else default_tiny_dir()
    final = root / variant_key(faces)
    if (final / "hub").is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    try:
        hub = tmp / "hub"
        rev = hashlib.sha1(variant_key(faces).encode()).hexdigest()
        guard_snap = _snapshot_dir(hub, GUARDRAIL_REPO, rev)
        _write_blocklist(guard_snap / "blocklist")
        _write_face_filter(guard_snap / "face_blur_filter" / "Resnet50_Final.pth", faces)
        _write_text_guard(_snapshot_dir(hub, TEXT_GUARD_REPO, rev))
        _make_group_unwritable(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "hub").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def link_local_checkpoints(home: str | os.PathLike, guardrail_dir: str | os.PathLike, text_guard_dir: str | os.PathLike) -> Path:
    """Make `home` an HF_HOME whose hub cache points at local checkpoint directories.

    cosmos_guardrail only accepts hub ids (it calls `snapshot_download`, and Qwen3Guard's id is
    hard-coded), so local copies of nvidia/Cosmos-1.0-Guardrail and Qwen/Qwen3Guard-Gen-0.6B are
    served through a hub cache whose snapshot entries are symlinks to them.
    """
    hub = Path(home) / "hub"
    for repo_id, src in ((GUARDRAIL_REPO, guardrail_dir), (TEXT_GUARD_REPO, text_guard_dir)):
        src = Path(src).resolve()
        if not src.is_dir():
            raise FileNotFoundError(f"{src} is not a directory (expected a local copy of {repo_id})")
        snap = _snapshot_dir(hub, repo_id, hashlib.sha1(str(src).encode()).hexdigest())
        for entry in src.iterdir():
            (snap / entry.name).symlink_to(entry)
    return Path(home)


def _snapshot_dir(hub: Path, repo_id: str, revision: str) -> Path:
    repo_dir = hub / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    # huggingface_hub reads the ref verbatim: no trailing newline.
    (repo_dir / "refs" / "main").write_text(revision)
    snap = repo_dir / "snapshots" / revision
    snap.mkdir(parents=True)
    return snap


def _write_blocklist(blocklist: Path) -> None:
    # All three word-list folders must exist; a blank line in exact_match would block every prompt.
    for folder, word in (("custom", BLOCKLIST_WORD), ("exact_match", EXACT_MATCH_WORD), ("whitelist", WHITELIST_WORD)):
        (blocklist / folder).mkdir(parents=True)
        (blocklist / folder / "tiny.txt").write_text(word + "\n")
    nltk_data = blocklist / "nltk_data"
    punkt = nltk_data / "tokenizers" / "punkt_tab" / "english"
    punkt.mkdir(parents=True)
    for name in _PUNKT_FILES:  # empty parameter files give a working (plain) sentence splitter
        (punkt / name).write_text("")
    wordnet = nltk_data / "corpora" / "wordnet"
    wordnet.mkdir(parents=True)
    (wordnet / "lexnames").write_text("00\tadj.all\t3\n01\tadj.pert\t3\n02\tadv.all\t4\n03\tnoun.Tops\t1\n")
    for pos in ("adj", "adv", "noun", "verb"):
        (wordnet / f"data.{pos}").write_text(_WORDNET_HEADER)
        (wordnet / f"{pos}.exc").write_text("")
        lemmas = _WORDNET_NOUNS if pos == "noun" else ()
        # index line: lemma pos n_synsets n_pointers n_senses n_tagged offsets...
        (wordnet / f"index.{pos}").write_text(
            _WORDNET_HEADER + "".join(f"{w} n 1 0 1 0 {i + 1:08d}\n" for i, w in enumerate(lemmas))
        )
    # sense key -> synset offset (WordNetCorpusReader maps versions through it at load time)
    (wordnet / "index.sense").write_text(
        "".join(f"{w}%1:03:00:: {i + 1:08d} 1 0\n" for i, w in enumerate(_WORDNET_NOUNS))
    )


def _write_face_filter(path: Path, faces: str) -> None:
    """RetinaFace-ResNet50 detection heads only (non-strict load keeps the backbone's own init)."""
    import torch

    path.parent.mkdir(parents=True)
    fpn_levels, anchors, channels = 3, 2, 256  # retinaface.data.cfg_re50: out_channel 256, 2 anchors
    face_logit = 8.0 if faces == "all" else -8.0
    state = {}
    for level in range(fpn_levels):
        for head, outputs in (("ClassHead", 2), ("BboxHead", 4), ("LandmarkHead", 10)):
            state[f"module.{head}.{level}.conv1x1.weight"] = torch.zeros(anchors * outputs, channels, 1, 1)
            bias = torch.zeros(anchors * outputs)
            if head == "ClassHead":  # per anchor: [background, face]
                bias = torch.tensor([-face_logit, face_logit] * anchors)
            state[f"module.{head}.{level}.conv1x1.bias"] = bias
    torch.save(state, path)


def _build_text_guard_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL_TOKENS])
    words = [_ANSWER_SAFE] + [p for p, _ in _TRIGGER_ANSWERS] + [a for _, a in _TRIGGER_ANSWERS]
    tok.add_tokens([AddedToken(w, special=False, normalized=False) for w in words])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=_CHAT_TEMPLATE,
        model_max_length=32768,
    )


def _write_text_guard(snapshot: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = _build_text_guard_tokenizer()
    vocab = len(tokenizer)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    safe_id = tokenizer.convert_tokens_to_ids(_ANSWER_SAFE)
    triggers = [tokenizer.convert_tokens_to_ids(p) for p, _ in _TRIGGER_ANSWERS]
    answers = [tokenizer.convert_tokens_to_ids(a) for _, a in _TRIGGER_ANSWERS]

    # Residual stream layout (hidden 8): 0 = constant 1, 1..3 = "this token is trigger k",
    # 4 = "this token is an answer", 5..7 = attention-written count of trigger k in the context.
    hidden, n_trig = 8, len(triggers)
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=4, max_position_embeddings=32768,
        tie_word_embeddings=False, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id, dtype="float32",
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    gain = 1.0e6  # any trigger count >= 1 in a prompt shorter than ~1e5 tokens outweighs "Safe"
    suppress = 1.0e9  # after an answer token, only end-of-sequence may follow
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.model.norm, *[m for m in model.modules() if type(m).__name__ == "Qwen3RMSNorm"]):
            norm.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 1.0
        for k, t in enumerate(triggers):
            emb[t, 1 + k] = 1.0
        for a in (safe_id, *answers):
            emb[a, 4] = 1.0
        attn = model.model.layers[0].self_attn  # q = k = 0: uniform causal attention
        for k in range(n_trig):
            attn.v_proj.weight[k, 1 + k] = 1.0
            attn.o_proj.weight[5 + k, k] = 1.0
        head = model.lm_head.weight
        head[safe_id, 0] = 2.0
        head[safe_id, 4] = -suppress
        for k, a in enumerate(answers):
            head[a, 0] = 1.0
            head[a, 5 + k] = gain
            head[a, 4] = -suppress
        head[eos, 4] = 10.0

    gen = GenerationConfig(do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, max_new_tokens=128)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        gen.save_pretrained(tmp)
        for f in Path(tmp).iterdir():
            shutil.copyfile(f, snapshot / f.name)


def _make_group_unwritable(tree: Path) -> None:
    # NLTK refuses group/world-writable files; do not depend on the caller's umask.
    for dirpath, dirnames, filenames in os.walk(tree):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m safety_worker.tiny",
        description="Build the tiny offline guardrail checkpoint (a hub cache for HF_HOME) and print its directory.",
    )
    parser.add_argument("outdir", nargs="?", default=None, help=f"cache root (default: {default_tiny_dir()})")
    parser.add_argument("--faces", choices=FACE_VARIANTS, default="none",
                        help="face filter variant: 'none' leaves frames unchanged, 'all' pixelates every frame")
    args = parser.parse_args(argv)
    print(build_tiny_guardrail(args.outdir, faces=args.faces))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
