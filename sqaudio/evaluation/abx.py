"""ZeroSpeech 2019 scores of a speech codec: the ABX error of its codes (by context, within and across speakers,
DTW over frame distances; every triplet) and the official bitrate (code entropy times symbols per second).
Definitions, averaging, frame alignment and how it is fast: docs/abx.md."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from sqaudio.errors import UserError
from sqaudio.evaluation.items import Items, code_timing, frame_spans
from sqaudio.evaluation.metrics import CodeUsage
from sqaudio.evaluation.runs import named_result_path

DISTANCES = ("codes", "symbols", "continuous")  # angular between codebook vectors, 0/1 on symbols, angular on z
PAIR_BUDGET = 1 << 21  # frame distances and padded frame values per DTW batch (bounds memory)
console = Console(stderr=True)
Advance = Callable[[int], None]


@dataclass
class Frames:
    """Frame features of every file with their frame distance: `table` (K, K) between integer codes when the files
    hold (T,) long tensors, or None for the angular distance between the rows of (T, D) float tensors."""

    files: list[torch.Tensor]
    table: torch.Tensor | None = None


def angular(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cosine similarity) / pi in [0, 1] between the rows of a (..., N, D) and b (..., M, D) -> (..., N, M)
    (a zero vector is at 0.5 from everything)."""
    a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    return (a @ b.transpose(-1, -2)).clamp(-1, 1).acos() / math.pi


def code_frames(codes: list[torch.Tensor], codebook: torch.Tensor) -> Frames:
    """Codes scored by the angular distance of their codebook vectors (K, D) (exactly 0 between equal codes)."""
    return Frames(codes, angular(codebook.float(), codebook.float()).fill_diagonal_(0.0))


def symbol_frames(codes: list[torch.Tensor], codebook_size: int) -> Frames:
    """Codes scored as symbols: distance 0 between equal codes, 1 otherwise."""
    return Frames(codes, 1.0 - torch.eye(codebook_size, device=codes[0].device))


def dtw(dist: torch.Tensor, n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Normalised DTW of a batch of frame-distance matrices dist (B, N, M), each over its first n x m entries ->
    (B,): the cost of the cheapest monotone path (steps (1,0), (0,1), (1,1)) from (0, 0) to (n-1, m-1), divided by
    the number of cells on it. Among equally cheap predecessors the diagonal wins, then the shorter path (so
    dtw(d) == dtw(d.T) exactly). The cells are filled one anti-diagonal at a time for the whole batch, stored
    cell-major (one contiguous row of B values per cell)."""
    batch, rows, cols = dist.shape
    width = cols + 1
    cost = dist.new_full(((rows + 1) * width, batch), math.inf)
    cost[0] = 0.0
    length = torch.zeros_like(cost)
    flat_dist = dist.reshape(batch, -1).T.contiguous()
    for k in range(rows + cols - 1):
        i = torch.arange(max(0, k - cols + 1), min(k, rows - 1) + 1, device=dist.device)
        j = k - i
        diag, up, left = i * width + j, i * width + j + 1, (i + 1) * width + j
        c_diag, c_up, c_left = cost[diag], cost[up], cost[left]
        l_diag, l_up, l_left = length[diag], length[up], length[left]
        side = (c_left < c_up) | ((c_left == c_up) & (l_left <= l_up))
        c_side, l_side = torch.where(side, c_left, c_up), torch.where(side, l_left, l_up)
        take_diag = c_diag <= c_side
        cost[left + 1] = flat_dist[i * cols + j] + torch.where(take_diag, c_diag, c_side)
        length[left + 1] = 1.0 + torch.where(take_diag, l_diag, l_side)
    end, columns = n * width + m, torch.arange(batch, device=dist.device)
    return cost[end, columns] / length[end, columns]


class _ItemFrames:
    """Where each item's frames lie in the files of `frames` concatenated (one tensor, no copy per item)."""

    def __init__(self, frames: Frames, items: Items, spans: tuple[np.ndarray, np.ndarray]):
        device = frames.files[0].device
        self.flat = torch.cat(frames.files)
        self.table = frames.table
        offsets = np.cumsum([0] + [len(f) for f in frames.files])[:-1]
        self.start = torch.as_tensor(offsets[items.file] + spans[0], device=device)
        self.length = torch.as_tensor(spans[1] - spans[0], device=device)

    def padded(self, which: torch.Tensor, size: int) -> torch.Tensor:
        """The frames of items `which` (B,) padded to `size` by repeating each one's last frame: (B, size[, D])."""
        steps = torch.arange(size, device=which.device)[None, :]
        return self.flat[self.start[which, None] + torch.minimum(steps, self.length[which, None] - 1)]

    def distances(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """DTW distance between the frames of items u (B,) and v (B,)."""
        n, m = self.length[u], self.length[v]
        x, y = self.padded(u, int(n.max())), self.padded(v, int(m.max()))
        dist = self.table[x[:, :, None], y[:, None, :]] if self.table is not None else angular(x.float(), y.float())
        return dtw(dist, n, m)


def pair_distances(frames: _ItemFrames, u: torch.Tensor, v: torch.Tensor, advance: Advance | None = None
                   ) -> torch.Tensor:
    """DTW distances of the item pairs (u, v), in batches of pairs of similar lengths (little padding)."""
    out = torch.empty(len(u), device=u.device)
    if len(u) == 0:
        return out
    longer = frames.length[u] >= frames.length[v]
    u, v = torch.where(longer, u, v), torch.where(longer, v, u)
    n, m = frames.length[u], frames.length[v]
    order = torch.argsort(n * (int(m.max()) + 1) + m)
    n_sorted, m_sorted = n[order], m[order]
    dim = frames.flat.shape[1] if frames.flat.dim() == 2 else 0
    start = 0
    while start < len(order):
        size = int(n_sorted[start])
        same = int(torch.searchsorted(n_sorted, size, right=True))
        most = int(m_sorted[same - 1])
        stop = min(same, start + max(1, PAIR_BUDGET // (size * most + (size + most) * dim)))
        chunk = order[start:stop]
        out[chunk] = frames.distances(u[chunk], v[chunk])
        if advance:
            advance(len(chunk))
        start = stop
    return out


def context_cells(dist: torch.Tensor, phone: torch.Tensor, speaker: torch.Tensor, n_phones: int, n_speakers: int
                  ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Triplet counts of one context from its items' distance matrix dist (n, n) and their phone and speaker ids
    (< n_phones, < n_speakers).

    Returns, for "within" and "across", (keys, correct, triplets) per cell: within cells are (speaker, A, B),
    across cells (A, B, speaker of a and b, speaker of x); `correct` counts d(a, x) < d(b, x) as 1 and ties as 1/2.
    """
    n = len(phone)
    groups, group, size = torch.unique(phone * n_speakers + speaker, return_inverse=True, return_counts=True)
    g_phone, g_speaker, g_start = groups // n_speakers, groups % n_speakers, torch.cumsum(size, 0) - size
    _, rank = torch.unique(dist, return_inverse=True)
    ranks = int(rank.max()) + 1
    rows = torch.arange(n, device=dist.device)
    keys = ((rows[:, None] * len(groups) + group[None, :]) * ranks + rank).flatten().sort().values
    x, a = ((phone[:, None] == phone[None, :]) & (rows[:, None] != rows[None, :])).nonzero(as_tuple=True)
    by_speaker = torch.argsort(g_speaker, stable=True)
    first = torch.searchsorted(g_speaker[by_speaker], speaker[a])
    count = torch.searchsorted(g_speaker[by_speaker], speaker[a], right=True) - first
    pair = torch.repeat_interleave(torch.arange(len(x), device=dist.device), count)
    offset = torch.arange(len(pair), device=dist.device) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    h = by_speaker[first[pair] + offset]
    x, a = x[pair], a[pair]
    keep = g_phone[h] != phone[x]
    x, a, h = x[keep], a[keep], h[keep]
    value = (x * len(groups) + h) * ranks + rank[x, a]
    right, left = torch.searchsorted(keys, value, right=True), torch.searchsorted(keys, value)
    correct = (x * n + g_start[h] + size[h] - right) + 0.5 * (right - left)
    within = speaker[a] == speaker[x]
    cells = {"within": ([speaker[x], phone[x], g_phone[h]], [n_speakers, n_phones, n_phones]),
             "across": ([phone[x], g_phone[h], speaker[a], speaker[x]], [n_phones, n_phones, n_speakers, n_speakers])}
    masks = {"within": within, "across": ~within}
    return {k: _summed(*cells[k], masks[k], correct, size[h]) for k in cells}


def _summed(columns: list[torch.Tensor], sizes: list[int], rows: torch.Tensor, correct: torch.Tensor,
            total: torch.Tensor) -> tuple[np.ndarray, ...]:
    """(distinct cells (m, len(columns)), summed correct, summed triplets) over `rows`, as numpy; column i holds
    ids below sizes[i]."""
    key = torch.zeros(int(rows.sum()), dtype=torch.long, device=rows.device)
    for column, size in zip(columns, sizes):
        key = key * size + column[rows]
    cells, inverse = torch.unique(key, return_inverse=True)
    sums = torch.zeros(len(cells), 2, dtype=torch.float64, device=key.device)
    sums.index_add_(0, inverse, torch.stack([correct[rows], total[rows]], 1).double())
    decoded = []
    for size in reversed(sizes):
        decoded.append(cells % size)
        cells = cells // size
    keys = torch.stack(decoded[::-1], 1).cpu().numpy()
    return keys, sums[:, 0].cpu().numpy(), sums[:, 1].cpu().numpy()


def _mean_by(keys: np.ndarray, values: np.ndarray, columns: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean of `values` over the rows of `keys` sharing `columns` -> (those key rows, means)."""
    uniq, inverse = np.unique(keys[:, columns], axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    return uniq, np.bincount(inverse, weights=values) / np.bincount(inverse)


def average(keys: np.ndarray, scores: np.ndarray, mode: str) -> float | None:
    """ZeroSpeech averaging of cell scores (context first column, then the `context_cells` key): mean over contexts,
    then over speakers (within) or (a/b speaker, x speaker) pairs (across), then over (A, B) phone pairs -> error %."""
    if len(keys) == 0:
        return None
    no_context = list(range(1, keys.shape[1]))
    keys, scores = _mean_by(keys, scores, no_context)          # mean over contexts
    phones = [1, 2] if mode == "within" else [0, 1]
    _, scores = _mean_by(keys, scores, phones)                 # mean over speakers
    return float(100.0 * (1.0 - scores.mean()))                # mean over (A, B)


def abx_errors(frames: Frames, items: Items, spans: tuple[np.ndarray, np.ndarray], progress: Progress | None = None,
               label: str = "") -> dict[str, Any]:
    """ABX error % within and across speakers (None where no triplet exists) of `frames` on `items`, whose frames
    are `spans` (start, stop) of their files, with the number of triplets and item pairs scored."""
    with _one_cpu_thread(frames.files[0].device):
        return _abx_errors(frames, items, spans, progress, label)


@contextmanager
def _one_cpu_thread(device: torch.device):
    """Run on one CPU thread: the tensors here are small, so torch's intra-op threads cost more in synchronisation
    than they gain (10-20x slower with 2 threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if device.type == "cpu" else threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _abx_errors(frames: Frames, items: Items, spans: tuple[np.ndarray, np.ndarray], progress: Progress | None,
                label: str) -> dict[str, Any]:
    device = frames.files[0].device
    groups = _scored_contexts(items)
    u, v, where = _context_pairs(groups, device)
    dist = torch.zeros(sum(len(g) ** 2 for g in groups), device=device)
    found = pair_distances(_ItemFrames(frames, items, spans), u, v, _ticker(progress, f"{label} DTW", len(u)))
    dist[where[0]], dist[where[1]] = found, found
    phone, speaker = torch.as_tensor(items.phone, device=device), torch.as_tensor(items.speaker, device=device)
    tick = _ticker(progress, f"{label} triplets", len(groups))
    cells: dict[str, list] = {"within": [], "across": []}
    start = 0
    for context, members in enumerate(groups):
        n, index = len(members), torch.as_tensor(members, device=device)
        part = context_cells(dist[start:start + n * n].view(n, n), phone[index], speaker[index], len(items.phones),
                             len(items.speakers))
        for mode, (keys, correct, total) in part.items():
            cells[mode].append((np.column_stack([np.full(len(keys), context), keys]), correct, total))
        start += n * n
        if tick:
            tick(1)
    return {**{f"abx_{mode}_pct": _cell_average(cells[mode], mode) for mode in cells},
            **{f"triplets_{mode}": int(sum(c[2].sum() for c in cells[mode])) for mode in cells},
            "item_pairs": len(u), "contexts_scored": len(groups)}


def _ticker(progress: Progress | None, label: str, total: int) -> Advance | None:
    """A progress bar task of `total` steps and the function that advances it (None without a progress)."""
    if progress is None:
        return None
    task = progress.add_task(label.strip(), total=total)
    return lambda k: progress.advance(task, k)


def _cell_average(parts: list, mode: str) -> float | None:
    if not parts:
        return None
    keys, correct, total = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return average(keys[total > 0], correct[total > 0] / total[total > 0], mode)


def _scored_contexts(items: Items) -> list[np.ndarray]:
    """Item indices of each context holding at least two different phones."""
    order = np.argsort(items.context, kind="stable")
    bounds = np.flatnonzero(np.diff(items.context[order])) + 1
    return [g for g in np.split(order, bounds) if len(np.unique(items.phone[g])) > 1]


def _context_pairs(groups: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Every unordered pair of items within each context: (u, v, (flat index of (u, v), of (v, u))) in the
    concatenated (n, n) distance matrices of the contexts."""
    us, vs, where, wheret, start = [], [], [], [], 0
    for members in groups:
        n = len(members)
        i, j = np.triu_indices(n, 1)
        us.append(members[i]), vs.append(members[j])
        where.append(start + i * n + j), wheret.append(start + j * n + i)
        start += n * n

    def cat(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.as_tensor(np.concatenate(parts) if parts else np.zeros(0, np.int64), device=device)

    return cat(us), cat(vs), (cat(where), cat(wheret))


def zerospeech_bitrate(codes: list[np.ndarray], seconds: float, codebook_size: int) -> dict[str, float]:
    """The ZeroSpeech 2019 bitrate of code files lasting `seconds` in all: entropy (bits) of the symbols over all
    their frames times symbols per second (frames / seconds)."""
    usage = CodeUsage(codebook_size)
    for c in codes:
        usage.add(torch.as_tensor(c), None)
    summary = usage.summary()
    rate = summary["positions"] / seconds
    return {"zerospeech_bitrate_bps": summary["code_entropy_bits"] * rate, "symbols_per_second": rate,
            "code_entropy_bits": summary["code_entropy_bits"]}


@dataclass
class Encodings:
    """What a codec made of the audio files: codes (T',) per file, each file's seconds, and, when asked, the
    encoder's continuous output (T', D) per file."""

    codes: list[np.ndarray]
    seconds: list[float]
    continuous: list[torch.Tensor] | None


@torch.no_grad()
def encode_files(codec, paths: list[Path], continuous: bool = False, advance: Advance | None = None) -> Encodings:
    """Encode every file once with `codec` (`sqaudio.codec.codec.Codec`)."""
    model, out = codec.model, Encodings([], [], [] if continuous else None)
    for path in paths:
        enc = codec.encode(path, keep_mel=continuous)
        out.codes.append(enc.codes)
        out.seconds.append(enc.samples / codec.features.sample_rate)
        if continuous:
            z = model.encoder(torch.from_numpy(enc.mel)[None].to(codec.device))[0, :model.dim].T
            out.continuous.append(z[:len(enc.codes)].float())
        if advance:
            advance(1)
    return out


def frames_for(name: str, enc: Encodings, codec) -> Frames:
    """The frames and frame distance that `name` (one of DISTANCES) scores."""
    if name == "continuous":
        return Frames(enc.continuous)
    codes = [torch.as_tensor(c, device=codec.device) for c in enc.codes]
    if name == "symbols":
        return symbol_frames(codes, codec.model.recipe.quantizer.codebook_size)
    return code_frames(codes, codec.model.quantizer.codebook_vectors().detach())


def evaluate_abx(run, items: Items, audio: list[Path], distances: list[str],
                 bitrate_audio: list[tuple[Path, float]] | None = None, quiet: bool = False) -> dict[str, Any]:
    """ZeroSpeech 2019 scores of a trained speech run (`TrainedRun`) on `items`, whose files are `audio`: the ABX
    errors under each of `distances` (the first one gives abx_across_pct / abx_within_pct) and the bitrate over
    the item files, or over `bitrate_audio` (file, listed seconds) as the challenge does with its bitrate list."""
    from sqaudio.codec.codec import Codec

    bad = [d for d in distances if d not in DISTANCES]
    if bad or not distances:
        raise UserError(f"unknown ABX distance '{bad[0] if bad else ''}' (valid: {', '.join(DISTANCES)})")
    codec = Codec(run.model, run.state)
    rate, first = code_timing(codec.features)
    result: dict[str, Any] = {"abx": {}}
    with Progress(console=console, disable=quiet) as progress:
        began = time.perf_counter()
        enc = encode_files(codec, audio, "continuous" in distances, _ticker(progress, "encode", len(audio)))
        result["encode_seconds"] = time.perf_counter() - began
        spans = frame_spans(items, np.array([len(c) for c in enc.codes]), rate, first)
        for name in distances:
            began = time.perf_counter()
            result["abx"][name] = abx_errors(frames_for(name, enc, codec), items, spans, progress, name)
            result["abx"][name]["score_seconds"] = time.perf_counter() - began
        codes, seconds = _bitrate_codes(codec, audio, enc, bitrate_audio, progress)
    main = result["abx"][distances[0]]
    K = run.model.recipe.quantizer.codebook_size
    result.update({key: main[key] for key in ("abx_across_pct", "abx_within_pct")}, distance=distances[0],
                  **zerospeech_bitrate(codes, seconds, K), bitrate_bps=math.log2(K) * rate,
                  bitrate_files=len(codes), bitrate_seconds=seconds, item=str(items.path.absolute()),
                  items=len(items), files=len(audio), code_rate_hz=rate, first_code_centre_s=first,
                  checkpoint=str(run.checkpoint), step=run.state.get("step"), recipe=run.model.recipe.name)
    return result


def _bitrate_codes(codec, audio: list[Path], enc: Encodings, listed: list[tuple[Path, float]] | None,
                   progress: Progress) -> tuple[list[np.ndarray], float]:
    """(codes, total seconds) the bitrate is computed over: the item files as encoded, or the listed files (encoding
    those not encoded yet) with their listed durations."""
    if listed is None:
        return enc.codes, float(sum(enc.seconds))
    known = dict(zip(audio, enc.codes))
    todo = [p for p, _ in listed if p not in known]
    known.update(zip(todo, encode_files(codec, todo, advance=_ticker(progress, "encode (bitrate)", len(todo))).codes))
    return [known[p] for p, _ in listed], float(sum(s for _, s in listed))


def leaderboard(result: dict[str, Any], language: str = "english") -> dict[str, Any]:
    """The result in the layout of the ZeroSpeech 2019 evaluation's output (ABX across speakers, %)."""
    abx = {("cosine" if k == "codes" else k): v["abx_across_pct"] for k, v in result["abx"].items()}
    return {"2019": {language: {"scores": {"abx": result["abx_across_pct"],
                                           "bitrate": result["zerospeech_bitrate_bps"]},
                                "details_bitrate": {"test": result["zerospeech_bitrate_bps"]},
                                "details_abx": {"test": abx}}}}


def abx_result_path(run_dir: Path, item: Path) -> Path:
    """Where a run keeps its ABX result on `item`: eval-abx-<item stem>.json (a UserError when that file holds
    the result of another item file with the same name)."""
    return named_result_path(run_dir, "abx", item, "item", "item file")
