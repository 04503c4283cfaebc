"""A tiny random ESRGAN built offline, for tests and CPU smoke runs of ``UPSCALER_MODEL``.

:class:`TinyRRDBNet` is Real-ESRGAN's ``RRDBNet`` (residual-in-residual dense blocks, nearest
upsampling with convolutions, pixel-unshuffle in front for 2x) at a toy size. Its state dict has
the key layout of the published Real-ESRGAN weights (``conv_first``, ``body.N.rdbK.convJ``,
``conv_body``, ``conv_up1/2``, ``conv_hr``, ``conv_last``), which is what spandrel's architecture
detection reads, so :func:`workers.upscaler.load_upscaler` loads the file through exactly the code
that loads a downloaded model. The module's own ``forward`` is an independent reference for tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

TINY_UPSCALER_SEED = 0
GROWTH = 32  # Real-ESRGAN's growth channels; spandrel builds every RRDB with this many


def _build_module(scale: int, num_filters: int, num_blocks: int) -> torch.nn.Module:
    import torch
    from torch import nn
    from torch.nn import functional

    class ResidualDenseBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(num_filters, GROWTH, 3, 1, 1)
            self.conv2 = nn.Conv2d(num_filters + GROWTH, GROWTH, 3, 1, 1)
            self.conv3 = nn.Conv2d(num_filters + 2 * GROWTH, GROWTH, 3, 1, 1)
            self.conv4 = nn.Conv2d(num_filters + 3 * GROWTH, GROWTH, 3, 1, 1)
            self.conv5 = nn.Conv2d(num_filters + 4 * GROWTH, num_filters, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(negative_slope=0.2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x1 = self.lrelu(self.conv1(x))
            x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
            x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
            x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
            x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
            return x5 * 0.2 + x

    class RRDB(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rdb1 = ResidualDenseBlock()
            self.rdb2 = ResidualDenseBlock()
            self.rdb3 = ResidualDenseBlock()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x

    class RRDBNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # 2x (and 1x) Real-ESRGAN models fold pixels into channels first, then upsample 4x.
            self.unshuffle = {4: 1, 2: 2, 1: 4}[scale]
            self.conv_first = nn.Conv2d(3 * self.unshuffle**2, num_filters, 3, 1, 1)
            self.body = nn.Sequential(*(RRDB() for _ in range(num_blocks)))
            self.conv_body = nn.Conv2d(num_filters, num_filters, 3, 1, 1)
            self.conv_up1 = nn.Conv2d(num_filters, num_filters, 3, 1, 1)
            self.conv_up2 = nn.Conv2d(num_filters, num_filters, 3, 1, 1)
            self.conv_hr = nn.Conv2d(num_filters, num_filters, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_filters, 3, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(negative_slope=0.2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            feat = functional.pixel_unshuffle(x, self.unshuffle) if self.unshuffle > 1 else x
            feat = self.conv_first(feat)
            feat = feat + self.conv_body(self.body(feat))
            feat = self.lrelu(self.conv_up1(functional.interpolate(feat, scale_factor=2, mode="nearest")))
            feat = self.lrelu(self.conv_up2(functional.interpolate(feat, scale_factor=2, mode="nearest")))
            return self.conv_last(self.lrelu(self.conv_hr(feat)))

    return RRDBNet()


class TinyRRDBNet:
    """Factory for the reference module (a class so tests can name what they build)."""

    @staticmethod
    def build(
        scale: int = 2, num_filters: int = 8, num_blocks: int = 1, *, pointwise: bool = False
    ) -> torch.nn.Module:
        """A seeded random Real-ESRGAN ``RRDBNet`` at ``scale`` (1, 2 or 4), in eval mode.

        ``pointwise`` keeps only the centre tap of every 3x3 kernel, so each output pixel
        depends on its own input pixel alone: tiled and whole-image runs then agree exactly.
        """
        import torch

        if scale not in (1, 2, 4):
            raise ValueError("Real-ESRGAN's RRDBNet comes in 1x, 2x and 4x")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_UPSCALER_SEED)
            module = _build_module(scale, num_filters, num_blocks)
            with torch.no_grad():
                if pointwise:
                    for layer in module.modules():
                        if isinstance(layer, torch.nn.Conv2d):
                            centre = layer.weight[:, :, 1, 1].clone()
                            layer.weight.zero_()
                            layer.weight[:, :, 1, 1] = centre
                # Random features come out faint (a spread of about 0.02); a stronger last layer
                # around mid-grey spreads the pixels over 0..1, so comparisons of outputs mean
                # something and few pixels clip.
                module.conv_last.weight.mul_(8.0)
                module.conv_last.bias.fill_(0.5)
        return module.eval()


def make_tiny_upscaler(
    path: Path,
    *,
    scale: int = 2,
    num_filters: int = 8,
    num_blocks: int = 1,
    pointwise: bool = False,
    fmt: Literal["safetensors", "pth"] = "safetensors",
) -> Path:
    """Save a tiny random Real-ESRGAN's weights as ``.safetensors`` or ``.pth``; returns the file.

    ``path`` is a folder (the file is ``tiny_esrgan_x{scale}.{fmt}`` in it) or a file name.
    Deterministic: the weights come from a fixed seed.
    """
    import torch

    module = TinyRRDBNet.build(scale, num_filters, num_blocks, pointwise=pointwise)
    state = {key: value.detach().contiguous() for key, value in module.state_dict().items()}
    path = Path(path)
    if path.suffix not in (".safetensors", ".pth"):
        path.mkdir(parents=True, exist_ok=True)
        path = path / f"tiny_esrgan_x{scale}.{fmt}"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        # Published .pth Real-ESRGAN files wrap the weights in "params_ema"; spandrel unwraps it.
        torch.save({"params_ema": state}, path)
    return path
