"""The training data sources: the synthetic world task, JSONL, save_to_disk datasets, reading order."""
import numpy as np
import pytest

from theworld.data.sources import DiskDataset, JsonlDataset, SampleStream, parse_columns, sample_text, write_jsonl
from theworld.data.synthetic import COLOURS, SyntheticMotionTask, SyntheticWorldTask


def answer(sample):
    return sample["messages"][1]["content"][0]["text"]


def test_synthetic_task_is_a_pure_function_of_seed_split_and_index():
    a, b = SyntheticWorldTask(size=16, seed=3), SyntheticWorldTask(size=16, seed=3)
    for i in range(16):
        assert a[i]["id"] == b[i]["id"] and answer(a[i]) == answer(b[i])
        np.testing.assert_array_equal(a[i]["images"][0], b[i]["images"][0])
    heldout = SyntheticWorldTask(split="heldout", size=16, seed=3)
    assert not any(np.array_equal(a[i]["images"][0], heldout[i]["images"][0]) for i in range(16))


def test_synthetic_answers_are_read_off_the_image():
    task = SyntheticWorldTask(size=64, questions=("colour",), image_size=32)
    for i in range(64):
        sample = task[i]
        image = sample["images"][0]
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        # The background is dark noise (< 48); the arrow's pixels are exactly its colour.
        colour = np.array(COLOURS[answer(sample)])
        assert (image == colour).all(axis=-1).sum() > 10


def test_synthetic_blocked_samples_are_exactly_the_listed_ids():
    from safety_worker.tiny import BLOCKED_PHRASE

    task = SyntheticWorldTask(size=200, blocked_fraction=0.1)
    with_phrase = {task[i]["id"] for i in range(200) if BLOCKED_PHRASE in sample_text(task[i])}
    assert with_phrase == task.blocked_ids and len(with_phrase) == 20


def test_jsonl_round_trip_keeps_ids_messages_and_pixels(tmp_path):
    task = SyntheticWorldTask(size=5)
    samples = [task[i] for i in range(5)]
    samples[1]["images"] += [np.roll(samples[1]["images"][0], k, axis=1) for k in range(1, 5)]  # a 5-frame clip
    path = write_jsonl(samples, tmp_path / "data" / "train.jsonl")
    loaded = JsonlDataset(path)
    assert len(loaded) == 5
    for original, back in zip(samples, loaded):
        assert back["id"] == original["id"] and back["messages"] == original["messages"]
        assert len(back["images"]) == len(original["images"])
        for x, y in zip(original["images"], back["images"]):
            np.testing.assert_array_equal(x, y)


def test_jsonl_reader_names_the_missing_keys_of_the_sample_it_reads(tmp_path):
    from theworld.data.sources import BadSample

    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "x", "messages": []}\n')
    with pytest.raises(BadSample, match=r"missing keys \['images'\]") as raised:
        JsonlDataset(path)[0]
    assert raised.value.sample_id == "x"


def test_disk_dataset_maps_columns_to_samples(tmp_path):
    import datasets
    from PIL import Image

    task = SyntheticWorldTask(size=4)
    rows = {"key": [], "picture": [], "prompt": [], "label": []}
    for i in range(4):
        rows["key"].append(f"row{i}")
        rows["picture"].append(Image.fromarray(task[i]["images"][0]))
        rows["prompt"].append(task[i]["messages"][0]["content"][1]["text"])
        rows["label"].append(answer(task[i]))
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    ds = DiskDataset(tmp_path / "ds", columns="id=key,images=picture,question=prompt,answer=label")
    sample = ds[2]
    assert sample["id"] == "row2" and answer(sample) == answer(task[2])
    assert sample["messages"][0]["content"][0] == {"type": "image"}
    np.testing.assert_array_equal(sample["images"][0], task[2]["images"][0])
    with pytest.raises(ValueError, match="data_columns"):
        DiskDataset(tmp_path / "ds")  # no 'images' column under the default names
    with pytest.raises(ValueError, match="unknown column role"):
        parse_columns("picture=img")


def test_sample_stream_shards_ranks_disjointly_and_resumes_at_a_position():
    data = list(range(10))
    ranks = [SampleStream(data, seed=1, rank=r, world_size=2) for r in range(2)]
    first_epoch = [ranks[r].index_at(p) for p in range(5) for r in range(2)]
    assert sorted(first_epoch) == data  # one epoch across both ranks covers every sample once
    stream = SampleStream(data, seed=1)
    it = stream.iter_from(0)
    run = [next(it) for _ in range(25)]
    resumed = stream.iter_from(13)
    assert [next(resumed) for _ in range(12)] == run[13:]


def test_a_saved_dataset_without_splits_needs_its_own_held_out_data(tmp_path):
    import datasets

    from theworld.train import DataArguments, open_datasets

    task = SyntheticWorldTask(size=2)
    rows = {"images": [task[i]["images"][0] for i in range(2)], "question": ["q", "q"], "answer": ["a", "b"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="set --eval-data"):  # else the training rows would be scored as held-out
        open_datasets(DataArguments(data=str(tmp_path / "plain")), seed=0)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "split"))
    train, heldout = open_datasets(DataArguments(data=str(tmp_path / "split")), seed=0)
    assert heldout.split == "test" and train.split == "train"


# ---------------------------------------------------------------- the motion task

def square_top_left(frame, colour):
    """Top-left of the square on the wrapped scene: the first of its rows/columns whose predecessor is not."""
    rows, cols = np.nonzero((frame == np.array(COLOURS[colour])).all(axis=-1))
    size = frame.shape[0]
    first = lambda values: next(v for v in sorted(set(values)) if (v - 1) % size not in set(values))
    return first(rows.tolist()), first(cols.tolist())


def test_motion_task_is_a_pure_function_with_the_fixed_sample_format():
    a, b = SyntheticMotionTask(size=8, seed=3), SyntheticMotionTask(size=8, seed=3, num_frames=9)
    for i in range(8):
        sample = a[i]
        assert set(sample) == {"id", "images", "messages", "question_type", "answer"}
        assert len(sample["images"]) == 9 and all(f.dtype == np.uint8 and f.shape == (32, 32, 3) for f in sample["images"])
        assert sample["question_type"] in ("direction", "colour") and answer(sample) == sample["answer"]
        for x, y in zip(sample["images"], b[i]["images"]):
            np.testing.assert_array_equal(x, y)
    assert SyntheticMotionTask(split="heldout", size=8, seed=3)[0]["id"] != a[0]["id"]


def test_motion_clips_move_one_pixel_per_frame_the_way_the_answer_says():
    task = SyntheticMotionTask(size=64, questions=("direction",))
    steps = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
    colour_task = SyntheticMotionTask(size=64, questions=("colour",))
    size = task.image_size
    for i in range(64):
        sample, same_scene = task[i], colour_task[i]  # same index and seed: same clip, other question
        colour = same_scene["answer"]
        positions = [square_top_left(frame, colour) for frame in sample["images"]]
        moves = {((b[0] - a[0]) % size, (b[1] - a[1]) % size) for a, b in zip(positions, positions[1:])}
        assert moves == {(steps[sample["answer"]][0] % size, steps[sample["answer"]][1] % size)}


def _end_positions(size=800):
    """(direction, first-frame top/left, last-frame top/left) of `size` clips."""
    task = SyntheticMotionTask(size=size, questions=("colour",))
    direction_task = SyntheticMotionTask(size=size, questions=("direction",))
    out = []
    for i in range(size):
        frames, colour = task[i]["images"], task[i]["answer"]
        out.append((direction_task[i]["answer"], square_top_left(frames[0], colour), square_top_left(frames[-1], colour)))
    return out


def test_no_single_frame_says_anything_about_the_direction():
    """The last frame's position, and the first's, are drawn from the same lattice whatever the direction."""
    task = SyntheticMotionTask(size=1)
    lattice = {(task.cell * i + 1, task.cell * j + 1) for i in range(4) for j in range(4)}
    last, first = {}, {}
    for direction, start, end in _end_positions():
        last.setdefault(direction, set()).add(end)
        first.setdefault(direction, set()).add(start)
    assert len(last) == 4 and all(s == lattice for s in last.values()), last
    assert all(s == lattice for s in first.values()), first


def test_a_time_reversed_clip_is_a_clip_the_task_draws():
    """Reversed, a clip moves the opposite way and ends on the lattice the task draws last positions from."""
    opposite = {"up": "down", "down": "up", "left": "right", "right": "left"}
    task = SyntheticMotionTask(size=64, questions=("direction",))
    colour_task = SyntheticMotionTask(size=64, questions=("colour",))
    assert task.reversal_in_distribution and not SyntheticMotionTask(num_frames=5).reversal_in_distribution
    lattice = {(task.cell * i + 1, task.cell * j + 1) for i in range(4) for j in range(4)}
    size = task.image_size
    for i in range(64):
        frames, colour = task[i]["images"][::-1], colour_task[i]["answer"]
        positions = [square_top_left(frame, colour) for frame in frames]
        step = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}[opposite[task[i]["answer"]]]
        assert {((b[0] - a[0]) % size, (b[1] - a[1]) % size) for a, b in zip(positions, positions[1:])} == {
            (step[0] % size, step[1] % size)}
        assert positions[-1] in lattice
        background = ~(frames[0] == np.array(COLOURS[colour])).all(-1) & ~(frames[-1] == np.array(COLOURS[colour])).all(-1)
        np.testing.assert_array_equal(frames[0][background], frames[-1][background])  # static background


def test_motion_task_trains_on_more_direction_questions_and_measures_both_alike():
    count = lambda task: sum(task[i]["question_type"] == "direction" for i in range(len(task))) / len(task)
    train, heldout = SyntheticMotionTask(size=1000), SyntheticMotionTask(split="heldout", size=1000)
    assert train.question_shares == {"direction": 0.75, "colour": 0.25} and abs(count(train) - 0.75) < 0.05
    assert heldout.question_shares == {"direction": 0.5, "colour": 0.5} and abs(count(heldout) - 0.5) < 0.05
    assert count(SyntheticMotionTask(size=200, question_weights=(0, 1))) == 0
    with pytest.raises(ValueError, match="question_weights"):
        SyntheticMotionTask(question_weights=(1,))
    with pytest.raises(ValueError, match="distinct"):
        SyntheticMotionTask(questions=("direction", "direction", "colour"))


def test_motion_task_refuses_frames_that_do_not_fit():
    with pytest.raises(ValueError, match="too small"):
        SyntheticMotionTask(num_frames=17, image_size=32)
    with pytest.raises(ValueError, match="multiple of cell"):
        SyntheticMotionTask(image_size=36)
