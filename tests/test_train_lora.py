"""Fine-tuning options: LoRA adapters on Gemma's language model (peft), gradient checkpointing, trackers."""
import json

import pytest
import torch
from safetensors.torch import load_file

from test_train import read_jsonl, run_in_process
from theworld import TheWorld
from theworld.train import ModelArguments, build_model, parse_report_to

LORA = ["--lora-r", "4", "--lora-alpha", "8"]


def test_lora_adapts_only_the_language_model_and_freezes_its_weights(tiny_models):
    gemma, cosmos = tiny_models
    model = build_model(ModelArguments(gemma_model=str(gemma), cosmos_model=str(cosmos), lora_r=4), seed=0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    adapters = {name for name in trainable if "lora_" in name}
    assert adapters and all(name.startswith("model.language_model.") for name in adapters)
    # Every attention and MLP projection of every layer got an adapter (A and B).
    layers = model.config.text_config.num_hidden_layers
    assert len(adapters) == layers * 7 * 2
    assert not any("lora_" in name for name, _ in model.model.vision_tower.named_parameters())
    base_language = {name for name in trainable if name.startswith("model.language_model.") and "lora_" not in name}
    assert base_language == set()
    assert not model.lm_head.weight.requires_grad
    assert any(name.startswith("world_projector.") for name in trainable)


def test_lora_target_modules_choose_the_adapted_projections(tiny_models):
    gemma, cosmos = tiny_models
    model = build_model(ModelArguments(gemma_model=str(gemma), cosmos_model=str(cosmos), lora_r=2,
                                       lora_target_modules="q_proj,v_proj"), seed=0)
    adapted = {name.split(".")[-4] for name, p in model.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj", "v_proj"}


def test_lora_run_saves_adapters_that_from_pretrained_restores(tmp_path, tiny_models, tiny_safety_worker):
    import resource

    peak_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = run_in_process(tmp_path, tiny_models, tiny_safety_worker.endpoint, *LORA, "--gradient-checkpointing",
                             "--world-image-size", "64,64", "--world-tokens-per-side", "4")
    assert summary["lora_r"] == 4 and summary["gradient_checkpointing"] is True
    # In this process: the run's peak (MiB) lies between this process's peak before the run and after it.
    assert peak_before_mb <= summary["peak_rss_mb"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert summary["peak_cuda_mb"] is None  # a CPU run
    saved = tmp_path / "model"
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 4
    weights = load_file(saved / "theworld_trainable.safetensors")
    lora_b = {name: w for name, w in weights.items() if "lora_B" in name}
    assert lora_b and any(w.abs().max() > 0 for w in lora_b.values())  # B starts at zero: it trained
    reloaded = TheWorld.from_pretrained(saved)
    params = dict(reloaded.named_parameters())
    assert all(torch.equal(params[name], w) for name, w in lora_b.items())
    assert reloaded.language_adapter_config.r == 4


def test_lora_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_models, tiny_safety_worker):
    flags = [*LORA, "--max-steps", "4", "--save-every", "2", "--eval-every", "2"]
    endpoint = tiny_safety_worker.endpoint
    run_in_process(tmp_path / "whole", tiny_models, endpoint, *flags)
    run_in_process(tmp_path / "parts", tiny_models, endpoint, *flags, "--stop-after-steps", "2")
    run_in_process(tmp_path / "parts", tiny_models, endpoint, *flags, "--resume")

    def losses(run):
        return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_jsonl(tmp_path / run / "metrics.jsonl")]

    assert losses("parts") == losses("whole")
    final = "checkpoints/step-000004/trainable.safetensors"
    a, b = load_file(tmp_path / "whole" / final), load_file(tmp_path / "parts" / final)
    assert any("lora_" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_models):
    from theworld.data.collator import TheWorldCollator
    from theworld.data.synthetic import SyntheticMotionTask

    gemma, cosmos = tiny_models
    task = SyntheticMotionTask(size=2, seed=0)
    grads = []
    for checkpointing in (False, True):
        model = build_model(ModelArguments(gemma_model=str(gemma), cosmos_model=str(cosmos), lora_r=4,
                                           lora_dropout=0.0), seed=0)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        loss = model(**TheWorldCollator(model)([task[0], task[1]])).loss
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and any("lora_" in n for n in grads_a)
    assert all(torch.allclose(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-4) for n in grads_a)


def test_report_to_takes_several_trackers_and_refuses_unknown_or_missing_ones():
    assert parse_report_to("none") == []
    assert parse_report_to("tensorboard") == ["tensorboard"]
    assert parse_report_to(" TensorBoard , all ") == ["tensorboard", "all"]
    with pytest.raises(ValueError, match="unknown tracker"):
        parse_report_to("tensorboard,tensorflow")
    with pytest.raises(ValueError, match="'none' alone"):
        parse_report_to("tensorboard,none")
    from accelerate.utils import LoggerType
    import importlib.util

    absent = [t.value for t in LoggerType if t.value != "all" and importlib.util.find_spec(t.value) is None]
    if absent:
        with pytest.raises(ValueError, match="pip install"):
            parse_report_to(f"tensorboard,{absent[0]}")


def test_tensorboard_shows_heldout_clips_with_the_models_answer_and_the_truth(tmp_path, tiny_models,
                                                                              tiny_safety_worker):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from theworld.data.synthetic import SyntheticMotionTask
    from theworld.evaluation import reference_answer

    run_in_process(tmp_path, tiny_models, tiny_safety_worker.endpoint, "--max-steps", "2", "--eval-every", "2",
                   "--heldout-examples", "2")
    events = EventAccumulator(str(next((tmp_path / "tensorboard").rglob("events.out.tfevents.*")).parent),
                              size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert {"heldout/0/frames", "heldout/1/frames"} <= set(events.Tags()["images"])
    frames = events.Images("heldout/0/frames")
    assert [e.step for e in frames] == [0, 2] and len(frames) == 2
    texts = events.Tensors("heldout/1/text_summary")
    assert [e.step for e in texts] == [0, 2]
    text = texts[-1].tensor_proto.string_val[0].decode()
    sample = SyntheticMotionTask(split="heldout", size=8, seed=0)[1]
    assert text.startswith(f"**{sample['id']}**") and "model: `" in text
    assert text.endswith(f"truth: `{reference_answer(sample)}`")
