"""ZeroSpeech ABX and bitrate: DTW against a plain reference, toy cases with known answers, every triplet against a
brute-force count, the bitrate formula, item-file errors, frame alignment and `evaluate --abx` end to end."""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sqaudio.config import load_recipe
from sqaudio.errors import UserError
from sqaudio.evaluation.abx import Frames, abx_errors, dtw, zerospeech_bitrate
from sqaudio.evaluation.items import check_contexts, code_timing, frame_spans, read_items
from sqaudio.models.sqvae import build_model

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
HEADER = "#file onset offset #phone prev-phone next-phone speaker\n"


def reference_dtw(d: np.ndarray) -> float:
    """The documented DTW, plainly: cheapest path cost over its length; among equally cheap predecessors the
    diagonal wins, then the shorter of the other two."""
    n, m = d.shape
    best = {(-1, -1): (0.0, 0)}
    for i, j in itertools.product(range(n), range(m)):
        sides = [best[p] for p in ((i - 1, j), (i, j - 1)) if p in best and min(p) >= 0]
        diag = best.get((i - 1, j - 1)) if (i > 0 and j > 0) or (i, j) == (0, 0) else None
        side = min(sides) if sides else None
        cost, length = diag if side is None or (diag is not None and diag[0] <= side[0]) else side
        best[i, j] = (cost + d[i, j], length + 1)
    cost, length = best[n - 1, m - 1]
    return cost / length


def libri_light_dtw(d: np.ndarray) -> float:
    """Libri-light's DTW (ABX_src/dtw.pyx), plainly: cheapest path cost over the length of the backtracked path."""
    n, m = d.shape
    cost = np.zeros((n, m))
    for i, j in itertools.product(range(n), range(m)):
        prev = [cost[a, b] for a, b in ((i - 1, j), (i - 1, j - 1), (i, j - 1)) if a >= 0 and b >= 0]
        cost[i, j] = d[i, j] + (min(prev) if prev else 0.0)
    i, j, length = n - 1, m - 1, 1
    while i > 0 and j > 0:
        up, left, diag = cost[i - 1, j], cost[i, j - 1], cost[i - 1, j - 1]
        if diag <= left and diag <= up:
            i, j = i - 1, j - 1
        elif left <= up:
            j -= 1
        else:
            i -= 1
        length += 1
    return cost[-1, -1] / (length + i + j)


def test_dtw_matches_a_plain_python_reference():
    g = torch.Generator().manual_seed(0)
    dist = torch.rand(64, 7, 9, generator=g, dtype=torch.float64)
    n, m = torch.randint(1, 8, (64,), generator=g), torch.randint(1, 10, (64,), generator=g)
    got = dtw(dist, n, m).numpy()
    for reference in (reference_dtw, libri_light_dtw):  # no ties in random distances: both rules agree
        assert got == pytest.approx([reference(dist[b, :n[b], :m[b]].numpy()) for b in range(64)], abs=1e-12)


def test_dtw_breaks_ties_as_documented_so_it_is_symmetric():
    dist = torch.randint(0, 2, (200, 6, 5), generator=torch.Generator().manual_seed(1)).double()
    n, m = torch.full((200,), 6), torch.full((200,), 5)
    got = dtw(dist, n, m)
    assert got.numpy() == pytest.approx([reference_dtw(d.numpy()) for d in dist], abs=1e-12)
    assert torch.equal(got, dtw(dist.transpose(1, 2).contiguous(), m, n))


def toy_items(tmp_path: Path, phones="abc", speakers="ST", contexts=("x_y", "y_z"), per_cell: int = 2):
    """An item file with `per_cell` tokens of each phone per speaker and context, every token in its own file of
    10 code frames at 100 Hz (frame i centred at i / 100 s) -> (Items, spans, rows (phone, speaker))."""
    lines, rows = [], []
    for context, speaker, phone, k in itertools.product(contexts, speakers, phones, range(per_cell)):
        prev, nxt = context.split("_")
        lines.append(f"f{len(rows)} 0.02 0.06 {phone} {prev} {nxt} {speaker}\n")
        rows.append((phones.index(phone), speakers.index(speaker)))
    path = tmp_path / "toy.item"
    path.write_text(HEADER + "".join(lines))
    items = read_items(path)
    return items, frame_spans(items, np.full(len(items.files), 10), 100.0, 0.0), rows


def test_features_that_separate_phones_give_zero_error(tmp_path):
    items, spans, rows = toy_items(tmp_path)
    one_hot = [torch.eye(3)[p].expand(10, 3) + 0.01 * s for p, s in rows]  # the speaker shifts every vector a little
    result = abx_errors(Frames(one_hot), items, spans)
    assert result["abx_within_pct"] == 0.0 and result["abx_across_pct"] == 0.0
    assert result["triplets_within"] == 2 * 2 * 3 * 2 * (2 * 1 * 2)  # contexts x speakers x (A, B) x x, a, b


def test_features_that_ignore_phones_give_fifty_percent(tmp_path):
    items, spans, rows = toy_items(tmp_path)
    speaker_only = [torch.tensor([1.0, float(s), 0.5]).expand(10, 3) for _, s in rows]
    result = abx_errors(Frames(speaker_only), items, spans)
    assert result["abx_within_pct"] == 50.0 and result["abx_across_pct"] == 50.0


def test_code_tables_score_equal_codes_as_ties(tmp_path):
    items, spans, rows = toy_items(tmp_path, per_cell=1)
    codes = [torch.full((10,), 7) for _ in rows]
    result = abx_errors(Frames(codes, 1.0 - torch.eye(8)), items, spans)
    assert result["abx_within_pct"] is None  # one token per phone and speaker: no a != x within a speaker
    assert result["abx_across_pct"] == 50.0


def brute_force(items, dist: np.ndarray, mode: str) -> float:
    """Every triplet one by one, averaged as the ZeroSpeech evaluation does (contexts, then speakers, then phones)."""
    cells: dict[tuple, list[float]] = {}
    n = len(items)
    for x, a, b in itertools.product(range(n), repeat=3):
        same = items.context[x] == items.context[a] == items.context[b]
        if not same or a == x or items.phone[a] != items.phone[x] or items.phone[b] == items.phone[x]:
            continue
        if items.speaker[a] != items.speaker[b] or (items.speaker[a] == items.speaker[x]) != (mode == "within"):
            continue
        key = (items.context[x], items.phone[x], items.phone[b], items.speaker[a], items.speaker[x])
        d_ax, d_bx = dist[a, x], dist[b, x]
        cells.setdefault(key, []).append(1.0 if d_ax < d_bx else 0.5 if d_ax == d_bx else 0.0)
    by_speakers: dict[tuple, list[float]] = {}
    for (context, pa, pb, sa, sx), scores in cells.items():
        by_speakers.setdefault((pa, pb, sa, sx), []).append(np.mean(scores))
    by_phones: dict[tuple, list[float]] = {}
    for (pa, pb, sa, sx), scores in by_speakers.items():
        by_phones.setdefault((pa, pb), []).append(np.mean(scores))
    return 100 * (1 - np.mean([np.mean(s) for s in by_phones.values()]))


def test_every_triplet_is_scored_and_averaged_like_the_reference(tmp_path):
    rng = np.random.default_rng(3)
    lines = [f"f{i} 0.0{rng.integers(0, 3)} 0.0{rng.integers(5, 10)} {rng.choice(list('abc'))} "
             f"{rng.choice(list('xy'))} y {rng.choice(list('STU'))}\n" for i in range(40)]
    (tmp_path / "r.item").write_text(HEADER + "".join(lines))
    items = read_items(tmp_path / "r.item")
    spans = frame_spans(items, np.full(len(items.files), 10), 100.0, 0.0)
    table = rng.integers(0, 3, size=(4, 4)) / 4  # few distinct distances: many ties
    table = np.triu(table, 1) + np.triu(table, 1).T
    codes = [torch.as_tensor(rng.integers(0, 4, size=10)) for _ in items.files]
    result = abx_errors(Frames(codes, torch.as_tensor(table, dtype=torch.float32)), items, spans)
    seq = [codes[items.file[i]][spans[0][i]:spans[1][i]].numpy() for i in range(len(items))]
    dist = np.array([[reference_dtw(table[seq[i]][:, seq[j]]) for j in range(len(items))] for i in range(len(items))])
    for mode in ("within", "across"):
        assert result[f"abx_{mode}_pct"] == pytest.approx(brute_force(items, dist, mode), abs=1e-4)


def test_zerospeech_bitrate_on_a_hand_computed_example():
    # symbols 0 x4, 1 x2, 2 x1, 3 x1: H = 1/2 * 1 + 1/4 * 2 + 2 * 1/8 * 3 = 1.75 bits; 8 symbols in 0.2 s: 40 per s
    result = zerospeech_bitrate([np.array([0, 0, 1, 1]), np.array([2, 3, 0, 0])], 0.2, codebook_size=16)
    assert result["code_entropy_bits"] == pytest.approx(1.75)
    assert result["symbols_per_second"] == pytest.approx(40.0)
    assert result["zerospeech_bitrate_bps"] == pytest.approx(70.0)


@pytest.mark.parametrize("line, reason", [
    ("f1 0.1 0.2 a x y", "expected 7 columns"),
    ("f1 0.1 zero a x y S", "must be numbers"),
    ("f1 0.3 0.2 a x y S", "0 <= onset < offset"),
    ("f1 nan 0.2 a x y S", "0 <= onset < offset"),
])
def test_item_parsing_errors_name_the_file_and_line(tmp_path, line, reason):
    path = tmp_path / "bad.item"
    path.write_text(HEADER + "f0 0.1 0.2 a x y S\n\n" + line + "\n")
    with pytest.raises(UserError) as err:
        read_items(path)
    assert str(err.value).startswith(f"{path}:4: ") and reason in str(err.value) and "\n" not in str(err.value)


def test_an_item_file_without_two_phones_in_any_context_is_refused(tmp_path):
    (tmp_path / "one.item").write_text(HEADER + "f0 0.1 0.2 a x y S\nf1 0.1 0.2 b x z S\nf2 0.1 0.2 a x y T\n")
    with pytest.raises(UserError, match="no context .* holds 2 different phones"):
        check_contexts(read_items(tmp_path / "one.item"))


def test_frames_are_the_ones_centred_inside_the_item_or_else_the_nearest(tmp_path):
    (tmp_path / "t.item").write_text(HEADER + "f 0.0 0.05 a x y S\nf 0.036 0.04 b x y S\nf 0.015 0.035 a x y S\n"
                                     "f 0.19 0.9 a x y S\n")
    items = read_items(tmp_path / "t.item")
    start, stop = frame_spans(items, np.array([10]), 50.0, 0.015)  # centres 0.015, 0.035, ..., 0.195
    assert start.tolist() == [0, 1, 0, 9] and stop.tolist() == [2, 2, 2, 10]
    (tmp_path / "late.item").write_text(HEADER + "f 0.3 0.4 a x y S\n")
    with pytest.raises(UserError, match=r"late.item:2: onset 0.3 s is past the end of f"):
        frame_spans(read_items(tmp_path / "late.item"), np.array([10]), 50.0, 0.015)


def test_code_timing_is_the_centre_of_each_codes_receptive_field():
    recipe = load_recipe("demo/tiny")
    model = build_model(recipe).eval()
    rate, first = code_timing(recipe.features)
    mel = torch.randn(1, recipe.features.n_mels, 64, requires_grad=True)
    t = 10
    model.encoder(mel)[0, :, t].sum().backward()
    used = mel.grad[0].abs().sum(0).nonzero().flatten()
    centre_frame = (used.min() + used.max()).item() / 2
    hop_s = recipe.features.hop_length / recipe.features.sample_rate
    assert centre_frame * hop_s == pytest.approx(first + t / rate)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A private copy of the recorded tiny run (results are written next to its checkpoint)."""
    return Path(shutil.copytree(GOLDEN / "run", tmp_path / "run"))


def test_evaluate_abx_names_audio_missing_for_the_item_file(cli, run_dir, tmp_path):
    (tmp_path / "m.item").write_text(HEADER + "spkA_0 0.1 0.2 a x y A\nnosuch 0.1 0.2 b x y A\n")
    result = cli("evaluate", run_dir, "--abx", tmp_path / "m.item", "--wavs", GOLDEN / "corpus", "--device", "cpu")
    assert result.exit_code == 2
    assert "names 1 file(s) with no audio in" in result.output and "nosuch" in result.output
    assert "Traceback" not in result.output and not list(run_dir.glob("eval-abx-*"))


def test_evaluate_abx_end_to_end_on_generated_speech(cli, run_dir, tmp_path):
    lines = [f"spk{s}_{u} {0.1 + 0.15 * k:.3f} {0.22 + 0.15 * k:.3f} {'aei'[(k + u) % 3]} x y {s}\n"
             for s, u, k in itertools.product("AB", range(2), range(4))]
    (tmp_path / "e2e.item").write_text(HEADER + "".join(lines))
    (tmp_path / "bitrate.txt").write_text("spkA_0.txt 2.0\nspkB_1.txt 2.0\n")
    out = tmp_path / "abx.json"
    result = cli("evaluate", run_dir, "--abx", tmp_path / "e2e.item", "--wavs", GOLDEN / "corpus", "--device", "cpu",
                 "--abx-distance", "codes", "--abx-distance", "continuous", "--bitrate-list", tmp_path / "bitrate.txt",
                 "--json", out)
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    assert scores == json.loads((run_dir / "eval-abx-e2e.json").read_text())
    for key in ("abx_across_pct", "abx_within_pct"):
        assert 0 <= scores[key] <= 100 and scores["abx"]["codes"][key] == scores[key]
        assert 0 <= scores["abx"]["continuous"][key] <= 100
    assert scores["bitrate_bps"] == pytest.approx(np.log2(32) * 50)  # nominal: log2 K x 50 codes per second
    assert scores["bitrate_seconds"] == 4.0 and scores["bitrate_files"] == 2
    assert 0 < scores["zerospeech_bitrate_bps"] <= np.log2(32) * scores["symbols_per_second"]
    assert scores["leaderboard"]["2019"]["english"]["scores"]["abx"] == scores["abx_across_pct"]
    assert "ABX across" in result.output


@pytest.mark.parametrize("args, message", [
    (["--abx", "{bad}", "--wavs", "{wavs}"], "bad.item:2: expected 7 columns"),
    (["--abx", "{one}", "--wavs", "{wavs}"], "holds 2 different phones"),
    (["--abx", "{one}"], "--abx needs --wavs DIR"),
    (["--wavs", "{wavs}"], "--wavs and --bitrate-list go with --abx"),
    (["--abx", "{one}", "--wavs", "{wavs}", "--data", "{wavs}"], "--data does not go with --abx"),
])
def test_evaluate_abx_refuses_bad_input_in_one_line(cli, run_dir, tmp_path, args, message):
    (tmp_path / "bad.item").write_text(HEADER + "spkA_0 0.1 0.2 a x y\n")
    (tmp_path / "one.item").write_text(HEADER + "spkA_0 0.1 0.2 a x y A\nspkB_0 0.1 0.2 b x z B\n")
    paths = {"bad": tmp_path / "bad.item", "one": tmp_path / "one.item", "wavs": GOLDEN / "corpus"}
    result = cli("evaluate", run_dir, *[a.format(**paths) for a in args], "--device", "cpu")
    assert result.exit_code == 2 and message in result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
