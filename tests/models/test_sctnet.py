"""SCTNet: exact parameter counts (trained and deployed), CFBlock attention, SIAM alignment,
deployment, official checkpoint layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hybridzoo
from hybridzoo.models.sctnet import CFBlock, ConvolutionalAttention, channel_wise_divergence, official_fps_settings
from hybridzoo.profile import count_params

from _seg_layouts import sctnet_to_official

TEACHER = dict(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1), decoder_dim=16)


def _small(siam=False, seed=0, **kw):
    torch.manual_seed(seed)
    return hybridzoo.create_model("sctnet_s_seg50", base_channels=16, spp_channels=16, num_classes=5, siam=siam,
                                  teacher_kwargs=TEACHER if siam else None, **kw)


@pytest.mark.parametrize("name, trained, deployed", [("sctnet_s_seg50", 4_693_062, 4_654_643),
                                                     ("sctnet_b_seg100", 17_588_326, 17_437_779)])
def test_exact_parameter_counts_trained_and_deployed(name, trained, deployed):
    with torch.device("meta"):
        model = hybridzoo.create_model(name)
        assert count_params(model) == trained                 # backbone + SCTHead + auxiliary head
        assert count_params(model.deploy()) == deployed       # backbone + SCTHead
        assert count_params(hybridzoo.create_model(name, aux_head=False)) == deployed


def test_siam_teacher_is_mit_b2_for_s_and_b3_for_b():
    with torch.device("meta"):
        s = hybridzoo.create_model("sctnet_s_seg50", siam=True)
        b = hybridzoo.create_model("sctnet_b_seg50", siam=True)
    assert count_params(s.siam.teacher.encoder) == 24_196_288
    assert count_params(b.siam.teacher.encoder) == 44_072_128
    # the official teacher decoder is 256 wide, so the SDHA projection maps x_out to 4 × 256
    assert s.siam.feature_transforms.out_channels == 1024 and s.siam.teacher.decode_head.linear_fuse.conv.out_channels == 256
    assert (s.siam.convstage3.out_channels, s.siam.convstage4.out_channels) == (320, 512)


def test_cfblock_is_conv_attention_with_shared_kernels():
    blk = CFBlock(128, 128)
    attn = blk.attn_l
    assert tuple(attn.kv.shape) == (64, 128, 7, 1) and tuple(attn.kv3.shape) == (64, 128, 1, 7)
    assert not attn.kv.any() and not attn.kv3.any()          # official init leaves the kernels at zero
    # key and value share one kernel: the attention has no parameters beyond BN and the two kernels
    assert count_params(attn) == 2 * 128 + 2 * 64 * 128 * 7
    # MLP: two 3×3 convs at ratio 1
    assert tuple(blk.mlp_l.conv1.weight.shape) == (128, 128, 3, 3)


def test_conv_attention_normalises_over_space_then_heads():
    torch.manual_seed(0)
    attn = ConvolutionalAttention(16, 16, inter_chs=64, num_heads=8)
    x = torch.randn(2, 64, 5, 7)
    y = attn._act_dn(x)
    # within each head (8 channels), the channels sum to 1 at every position ...
    assert torch.allclose(y.reshape(2, 8, 8, 35).sum(2), torch.ones(2, 8, 35), atol=1e-5)
    # ... after a softmax over the 35 positions of every channel
    sm = x.reshape(2, 8, 8, 35).softmax(-1)
    assert torch.allclose(y.reshape(2, 8, 8, 35), sm / (sm.sum(2, keepdim=True) + 1e-6), atol=1e-6)
    with torch.no_grad():
        attn.kv.normal_(0, 0.1)
        attn.kv3.normal_(0, 0.1)
    attn.eval()
    out = attn(torch.randn(1, 16, 9, 11))
    assert out.shape == (1, 16, 9, 11) and out.abs().sum() > 0


def test_training_returns_aux_and_eval_returns_logits():
    """Eval: logits at the input size, any size. Training: both heads' own 1/8 maps, which the loss resizes to the
    labels, as the model resizes them in eval (the same bilinear resize, so the same loss)."""
    model = _small()
    x = torch.randn(2, 3, 70, 100)
    model.train()
    out = model(x)
    assert set(out) == {"logits", "aux_logits"}
    assert out["logits"].shape == out["aux_logits"].shape == (2, 5, 9, 13)
    model.eval()
    with torch.no_grad():
        full = model(x)
        assert full.shape == (2, 5, 70, 100)
        train_logits = model.decode_head(model.forward_features(x)["x_out"])
    torch.testing.assert_close(F.interpolate(train_logits, size=(70, 100), mode="bilinear", align_corners=False),
                               full)


def test_channel_wise_divergence_by_hand():
    t = torch.tensor([[[[1.0, 2.0], [0.0, 3.0]]]])
    s = torch.tensor([[[[0.5, 0.5], [2.0, 1.0]]]])
    pt = np.exp(t.numpy().ravel() / 4)
    pt /= pt.sum()
    ps = np.exp(s.numpy().ravel() / 4)
    ps /= ps.sum()
    expected = 16 * np.sum(pt * np.log(pt / ps)) / (1 * 1)
    assert channel_wise_divergence(t, s).item() == pytest.approx(expected, rel=1e-5)
    assert channel_wise_divergence(t, t).item() == pytest.approx(0.0, abs=1e-6)
    # the student map is resized to the teacher's size
    assert channel_wise_divergence(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)).ndim == 0


def test_siam_loss_trains_the_student_through_the_frozen_teacher():
    model = _small(siam=True)
    model.train()
    assert not model.siam.teacher.training            # the teacher stays in eval mode
    out = model(torch.randn(2, 3, 64, 96))
    assert set(out) == {"logits", "aux_logits", "loss_siam"} and out["loss_siam"] > 0
    out["loss_siam"].backward()
    assert all(p.grad is None for p in model.siam.teacher.parameters())
    assert model.siam.feature_transforms.weight.grad.abs().sum() > 0    # SDHA path through the teacher decoder
    assert model.siam.convstage3.weight.grad.abs().sum() > 0           # BFA
    assert model.backbone.layer5.mlp_l.conv2.weight.grad.abs().sum() > 0
    assert model.decode_head.conv_seg.weight.grad is None              # SIAM does not touch the seg head


def test_deploy_drops_teacher_and_alignment_and_keeps_logits():
    model = _small(siam=True).eval()
    x = torch.randn(1, 3, 64, 64)
    deployed = model.deploy()
    names = [n for n, _ in deployed.named_parameters()]
    assert not any(n.startswith(("siam", "auxiliary_head")) for n in names)
    assert count_params(deployed) == count_params(model.backbone) + count_params(model.decode_head)
    with torch.no_grad():
        assert torch.equal(deployed(x), model(x))
    assert model.siam is not None                  # the original is untouched


def test_official_checkpoint_layout_loads(tmp_path):
    model = _small(siam=True).eval()
    with torch.no_grad():  # random BN statistics, so the comparison is not trivial
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    official = sctnet_to_official(model.state_dict())
    assert "auxiliary_head.1.teacher_backbone.layers.0.1.0.attn.attn.in_proj_weight" in official
    path = tmp_path / "sctnet_official.pth"
    torch.save({"meta": {"mmseg_version": "0.26.0"}, "state_dict": official}, path)
    x = torch.randn(2, 3, 64, 96)
    # deployed-style model (aux head, no SIAM): the teacher keys are dropped
    plain = hybridzoo.create_model("sctnet_s_seg50", base_channels=16, spp_channels=16, num_classes=5,
                                   pretrained=str(path)).eval()
    with_siam = hybridzoo.create_model("sctnet_s_seg50", base_channels=16, spp_channels=16, num_classes=5, siam=True,
                                       teacher_kwargs=TEACHER, pretrained=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
        feats = model.backbone(x)
        assert torch.equal(with_siam.siam(x, with_siam.backbone(x)), model.siam(x, feats))


def test_deployed_checkpoint_builds_the_deployed_network(tmp_path, capsys):
    """A checkpoint of the deployed network (backbone + decode head, no auxiliary head) loads by itself
    into the deployed architecture, and says so, instead of failing on 'missing auxiliary_head.*'."""
    model = _small().eval()
    deployed = {k: v for k, v in model.state_dict().items() if not k.startswith("auxiliary_head.")}
    path = tmp_path / "sctnet_deployed.pth"
    torch.save({"meta": {"mmseg_version": "0.26.0"}, "state_dict": deployed}, path)
    loaded = hybridzoo.create_model("sctnet_s_seg50", base_channels=16, spp_channels=16, num_classes=5,
                                    pretrained=str(path)).eval()
    assert loaded.auxiliary_head is None and "aux_head=False" in capsys.readouterr().out
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # a checkpoint missing other parts still fails, naming them
    broken = {k: v for k, v in deployed.items() if not k.startswith("decode_head.conv_seg")}
    torch.save({"state_dict": broken}, path)
    with pytest.raises(ValueError, match="missing keys.*decode_head"):
        hybridzoo.create_model("sctnet_s_seg50", base_channels=16, spp_channels=16, num_classes=5, pretrained=str(path))


def test_bench_configs_cover_the_official_fps_settings():
    cfgs = {(c["model"], tuple(c["input_size"])) for c in official_fps_settings()}
    assert ("sctnet_b_seg100", (3, 1024, 2048)) in cfgs and ("sctnet_s_seg50", (3, 512, 1024)) in cfgs
    assert all(m in hybridzoo.list_models("sctnet*") for m, _ in cfgs)
    rows = _small().bench_configs()
    assert [r["input_size"] for r in rows] == [(3, 1024, 2048)] * 2 + [(3, 512, 1024)] * 2
    deployed, teacher = rows[0]["module"], rows[1]["module"]
    assert deployed.auxiliary_head is None and deployed.siam is None
    assert type(teacher).__name__ != type(deployed).__name__


def test_teacher_trained_with_the_registered_segformer_config_loads(tmp_path):
    # `hybridzoo train --model segformer_b0` saves the registered (MLP-head) decoder; SIAM accepts it
    from safetensors.torch import save_file

    torch.manual_seed(0)
    trained = hybridzoo.create_model("segformer_b0", num_classes=5)
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    model = _small().enable_siam(teacher=str(path), teacher_model="segformer_b0").train()
    teacher = model.siam.teacher
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in trained.state_dict().items())
    out = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(out["loss_siam"])
