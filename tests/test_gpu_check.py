"""bench/gpu_check.sh, the prepared GPU run, works before a GPU ever sees it: its --device cpu --quick mode."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_runs_on_the_cpu(tmp_path):
    """Every section runs and passes at a toy size, and the Markdown report holds every check."""
    report = tmp_path / "gpu.md"
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--device", "cpu", "--quick", "--report", str(report)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    text = report.read_text()
    for expected in ("`supcon.py` | PASS", "`mlcl.py` | PASS", "`hmlc_gmm.py` | PASS", "`hmlc_attention.py` | PASS",
                     "`supcon.py --compile` | PASS", "`linear_eval.py --checkpoint` (mlcl run) | PASS",
                     "mlcl_loss (2 level heads), bf16 inputs | PASS", "gmm_masks, 512 x 128, 2 levels | PASS",
                     "interrupt + `--resume` = uninterrupted", "a NaN loss stops the run | PASS",
                     "SupCon training, data loading included", "2 chunks (no memory cap on a CPU)",
                     "--precision fp16 (loss scaler), whole batch | PASS", "0 failed checks"):
        assert expected in text, expected
    assert "FAIL" not in text
