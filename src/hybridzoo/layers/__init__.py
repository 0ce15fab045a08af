"""Blocks shared by two or more models. Layers import nothing of ours but other layers."""

from hybridzoo.layers.attention import Attention, attention_weights
from hybridzoo.layers.conv import ConvBnAct, DepthwiseSeparableConv, LayerNorm2d, SqueezeExcite
from hybridzoo.layers.conv_ffn import CONV_FFN_LAYOUTS, ConvFFN, convert_conv_ffn
from hybridzoo.layers.drop import DropPath, drop_path, drop_path_rates
from hybridzoo.layers.helpers import check_image_input, checkpoint_seq, run_blocks_for_prefix, to_2tuple
from hybridzoo.layers.mlp import Mlp, QuickGELU
from hybridzoo.layers.patch_embed import PatchEmbed, resample_abs_pos_embed
from hybridzoo.layers.weight_init import init_conv_fan_out_, init_weights_vit, trunc_normal_

__all__ = [
    "Attention", "attention_weights", "ConvBnAct", "ConvFFN", "CONV_FFN_LAYOUTS", "convert_conv_ffn",
    "DepthwiseSeparableConv", "LayerNorm2d", "SqueezeExcite",
    "DropPath", "drop_path", "drop_path_rates", "check_image_input", "checkpoint_seq", "run_blocks_for_prefix", "to_2tuple",
    "Mlp", "QuickGELU", "PatchEmbed", "resample_abs_pos_embed", "init_conv_fan_out_", "init_weights_vit",
    "trunc_normal_",
]
