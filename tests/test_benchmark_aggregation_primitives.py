"""benchmarks/aggregation_primitives.py runs end to end at tiny sizes and prints every table."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_aggregation_benchmark_prints_its_tables():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "aggregation_primitives.py"), "--threads", "1", "--reps", "1",
         "--quick", "--expand-sizes", "1000", "--d", "2000", "--peers", "2", "--clients", "3"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for heading in ("mask stream: expand (ChaCha20) vs torch.randint", "Shamir secret sharing",
                    "masked_input of d = 2,000", "CKKS aggregation", "commitments: 3 clients x 2,000"):
        assert heading in out, heading
    assert re.search(r"^1,000 +[\d.]+ +\d+ +[\d.]+ +\d+ +[\d.]+x$", out, re.M), out  # expand row with ratio
    assert "(3, 5)" in out and "(51, 100)" in out and "(501, 1000)" not in out  # --quick skips the last
    ckks = re.search(r"^[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +([\d,]+) +8,000 +([\d.]+)x +([\d.e+-]+)$", out, re.M)
    assert ckks, out
    assert abs(int(ckks.group(1).replace(",", "")) / 8000 - float(ckks.group(2))) < 0.01  # ct B / float32 B
    assert float(ckks.group(3)) < 1e-6  # CKKS sum decrypts to within 1e-6 of the float64 sum
    assert out.count("load average") == 2
