"""Model inversion of cut-layer activations by cut depth: seconds per attack and quality reached.

A LeNet-5 is trained by vanilla split learning (2 epochs) on the MNIST test set from
../shared/data/mnist (its 80/20 split), or on digits upsampled to 28x28 when that is absent. For
each cut, the server probes 16 test images' activations (a real split deployment's inference) and
every attack reconstructs them; PSNR and SSIM are scored against the images, which the attacker
never sees. He, Zhang, Lee (2019) report on MNIST, as PSNR dB / SSIM: conv1 white-box 39.69 /
0.997, inverse network 40.72 / 0.995 (same distribution) and 14.76 / 0.719 (random noise),
query-free 17.60 / 0.742; ReLU2 15.10 / 0.600, 20.81 / 0.805, 7.72 / 0.431, 9.61 / 0.498.

    python benchmarks/inversion_attacks.py [--images 16] [--cuts conv1,act1,pool1,conv2,act2,pool2]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from attacks.model_inversion import InverseNetwork, QueryFree, WhiteBoxInversion
from attacks.unsplit import UnSplit
from toolkit import data, metrics, models, seed_everything
from toolkit.split import SplitConfig, SplitNN, probe

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
HE_ET_AL = {("conv1", "white-box"): "39.69 / 0.997", ("conv1", "inverse net, same distribution"): "40.72 / 0.995",
            ("conv1", "inverse net, random noise"): "14.76 / 0.719", ("conv1", "query-free"): "17.60 / 0.742",
            ("act2", "white-box"): "15.10 / 0.600", ("act2", "inverse net, same distribution"): "20.81 / 0.805",
            ("act2", "inverse net, random noise"): "7.72 / 0.431", ("act2", "query-free"): "9.61 / 0.498"}


def attacks_for(cut: str, p, ds, shape):
    arch = lambda: models.cut(models.lenet(), at=cut)[0]  # noqa: E731  architecture only
    aux, aux_y = ds.x_train[:4000], ds.y_train[:4000]
    return {
        "white-box": WhiteBoxInversion(p.client_part, input_shape=shape),
        "inverse net, same distribution": InverseNetwork(p.client_part, aux=aux, input_shape=shape),
        "inverse net, random noise": InverseNetwork(p.client_part, aux="noise", input_shape=shape),
        "query-free": QueryFree(arch, p.server_part, aux=aux, aux_labels=aux_y, input_shape=shape),
        "UnSplit (architecture only)": UnSplit(arch, input_shape=shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--cuts", default="conv1,act1,pool1,conv2,act2,pool2")
    args = parser.parse_args()
    seed_everything(0)
    if SHARED_MNIST.is_dir():
        ds, source = data.load("mnist", root=SHARED_MNIST), "MNIST test set (8,000 train / 2,000 test)"
    else:
        ds, source = data.load("digits", image_size=28), "digits upsampled to 28x28 (../shared absent)"
    net = models.lenet()
    sl = SplitNN.vanilla(*models.cut(net, at="pool2"), ds,
                         config=SplitConfig(lr=0.05, momentum=0.9, batch_size=64, record=False))
    sl.fit(epochs=2)
    print(f"victim: LeNet-5 on {source}, test accuracy {sl.evaluate()['accuracy']:.3f}; {args.images} test images")
    x = ds.x_test[:args.images]
    print(f"\n{'cut':6s} {'attack':32s} {'PSNR dB':>8s} {'SSIM':>6s} {'seconds':>8s}   He et al. (PSNR / SSIM)")
    for cut in args.cuts.split(","):
        p = probe(net, cut, x)
        for name, attack in attacks_for(cut, p, ds, tuple(x.shape[1:])).items():
            t0 = time.perf_counter()
            result = attack.run(p.observed, generator=torch.Generator().manual_seed(0))
            seconds = time.perf_counter() - t0
            s = metrics.evaluate(result, x)
            print(f"{cut:6s} {name:32s} {s['psnr']:8.2f} {s['ssim']:6.3f} {seconds:8.1f}   "
                  f"{HE_ET_AL.get((cut, name), '')}", flush=True)


if __name__ == "__main__":
    main()
