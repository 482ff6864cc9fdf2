"""The README's main job (`sqaudio demo`) end to end at a few training steps."""
import json

import soundfile as sf


def test_demo_runs_the_whole_chain(cli, tmp_path):
    out = tmp_path / "demo"
    result = cli("demo", out, "--steps", "20", "--workers", "1")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "run" / "eval-test.json").read_text())
    assert metrics["mel_mse_db2"] > 0 and metrics["utterances"] > 0
    assert "listening report:" in result.output and "report" in result.output
    assert json.loads((out / "report" / "metrics.json").read_text())["run"]["pesq_wb"] > 0
    assert list((out / "report" / "audio").glob("*/original.wav"))
    wav, rate = sf.read(out / "reconstructed.wav")
    assert rate == 16000 and len(wav) > 16000 * 0.5
    for name in ("run/annealing.png", "reconstructed.png", "features/manifest.jsonl", "report/index.html",
                 "report/metrics.json"):
        assert (out / name).stat().st_size > 0
    again = cli("demo", out, "--steps", "20", "--workers", "1")  # re-running reuses what is done
    assert again.exit_code == 0 and "0 computed" in again.output.replace("\n", " ")
