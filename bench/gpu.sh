#!/usr/bin/env bash
# One command for a GPU machine with this repository and only the package registries reachable:
#   1. sets up (make setup: the virtual environment, PyTorch's CUDA build from the registry) and the data;
#   2. checks that CUDA works and that bf16 autocast trains a step;
#   3. runs the time-to-accuracy bench with the fmnist-gpu preset (bf16, channels_last, torch.compile, batch 512);
#   4. prints the numbers and writes bench/gpu.txt (and bench/gpu.json).
# Aimed at under 8 minutes on one H100/H200-class GPU. Without a GPU it says so and exits 0, changing nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || make setup
set +e
"$PY" - <<'PYEOF'
import sys
import torch
if not torch.cuda.is_available():
    print(f"no GPU: torch {torch.__version__} sees no CUDA device here; nothing run, bench/gpu.txt unchanged")
    sys.exit(3)
name = torch.cuda.get_device_name(0)
x = torch.randn(256, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                          torch.nn.Linear(16 * 32 * 32, 10)).cuda().to(memory_format=torch.channels_last)
with torch.autocast("cuda", dtype=torch.bfloat16):
    loss = net(x).float().logsumexp(1).mean()
loss.backward()
torch.cuda.synchronize()
ok = all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
print(f"GPU: {name}; CUDA {torch.version.cuda}; bf16 autocast step {'ok' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
PYEOF
status=$?
set -e
if [ "$status" -eq 3 ]; then exit 0; fi  # no GPU: said so above
if [ "$status" -ne 0 ]; then echo "the CUDA check failed (exit $status)" >&2; exit "$status"; fi
make data >/dev/null
cd bench
../.venv/bin/python time_to_accuracy.py --presets fmnist-gpu --seeds 0 --baseline-epochs 1 --no-command \
  --out gpu.json 2>&1 | grep -v "^epoch" | tee gpu.txt
