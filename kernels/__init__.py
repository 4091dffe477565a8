"""fastres.kernels: Triton kernels and their launchers (installed as ``fastres.kernels``)."""

from .conv import ConvConfig, conv_bias_act, conv_output_size, pick_config
from .pool import global_avg_pool, max_pool2d

__all__ = ["ConvConfig", "conv_bias_act", "conv_output_size", "global_avg_pool", "max_pool2d", "pick_config"]
