"""Cost models: monotone, step-shaped inside graph buckets, interpolated beyond, YAML round trip."""
import pytest
import torch

import dspark
from dspark.scheduling.cost_model import DEVICE_SPECS, CostModel, ModelSpec, analytic_cost_model, device_spec
from dspark.models import TargetConfig
from dspark.scheduling.planner import schedule_prefix

QWEN3_8B = TargetConfig(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
                        max_position_embeddings=40960)


def test_lookups_are_step_shaped_in_buckets_and_linear_beyond():
    model = CostModel(device="test", source="measured", verify_tokens=[1, 8, 16, 32], context_lens=[1024],
                      verify_seconds=[[1.0, 2.0, 3.0, 5.0]], graph_buckets=[1, 8, 16])
    assert model.verify_time(1) == 1.0
    assert model.verify_time(2) == model.verify_time(8) == 2.0       # padded to the 8-token graph
    assert model.verify_time(9) == 3.0                               # next bucket
    assert model.verify_time(24) == pytest.approx(4.0)               # beyond the buckets: interpolated
    assert model.verify_time(48) == pytest.approx(7.0)               # extrapolated from the last two points


def test_tables_are_made_monotone():
    noisy = CostModel(device="cpu", source="measured", verify_tokens=[1, 2, 4, 8], context_lens=[0, 512],
                      verify_seconds=[[1.0, 0.9, 2.0, 3.0], [2.0, 1.6, 1.8, 9.0]], draft_requests=[1, 2],
                      draft_seconds=[0.5, 0.4])
    # Isotonic regression pools the violators (a running max would have let 2.0 flatten the row).
    assert noisy.verify_seconds[0] == pytest.approx([0.95, 0.95, 2.0, 3.0])
    assert noisy.verify_seconds[1] == pytest.approx([1.8, 1.8, 1.8, 9.0])
    assert noisy.draft_seconds == pytest.approx([0.45, 0.45])
    assert noisy.verify_time(3, context_len=100) == pytest.approx(1.8)     # bucket 512, between 1.8 and 1.8


@pytest.mark.parametrize("device", sorted(DEVICE_SPECS))
def test_analytic_priors_are_monotone_and_believable(device):
    draft = dspark.models.DraftConfig(algorithm="dspark", vocab_size=151936, hidden_size=4096,
                                      intermediate_size=12288, num_layers=5, num_heads=32, num_kv_heads=8,
                                      head_dim=128, target_layer_ids=[1, 9, 17, 25, 33], num_target_layers=36,
                                      mask_token_id=151669)
    model = analytic_cost_model(device_spec(device), ModelSpec.from_configs(QWEN3_8B, draft))
    times = [model.verify_time(b, 2048) for b in range(1, 600)]
    assert all(b >= a for a, b in zip(times, times[1:]))
    assert model.verify_time(512, 8192) >= model.verify_time(512, 512)
    if device != "cpu":
        # An 8B model decodes in a few milliseconds on these devices; 512 verify tokens cost more.
        assert 1e-3 < model.verify_time(1, 2048) < 30e-3
        assert model.verify_time(512, 2048) > 1.5 * model.verify_time(1, 2048)
        assert model.draft_time(64) < model.verify_time(64 * 8, 2048)
    if device.startswith("ascend"):
        assert model.max_query_tokens_per_request == 16


def test_yaml_round_trip_and_bad_profiles(tmp_path):
    model = analytic_cost_model(device_spec("h100"), ModelSpec.from_configs(QWEN3_8B))
    path = model.to_yaml(tmp_path / "profile.yaml")
    again = CostModel.from_yaml(path)
    assert again.verify_time(77, 3000) == model.verify_time(77, 3000)
    (tmp_path / "bad.yaml").write_text("device: x\nsurprise: 1\n")
    with pytest.raises(ValueError, match="unknown key\\(s\\) surprise"):
        CostModel.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="dspark calibrate"):
        CostModel.from_yaml(tmp_path / "missing.yaml")


def test_sps_table_and_schedule_prefix_use_the_cost_model():
    model = CostModel(device="t", source="measured", verify_tokens=[1, 64], context_lens=[0],
                      verify_seconds=[[1.0, 1.0 + 63 * 0.05]], draft_requests=[1, 8], draft_seconds=[0.1, 0.1])
    sps = model.sps_table(8, num_requests=2)
    assert sps[0] == 0 and sps[2] == pytest.approx(1 / (1.05 + 0.1))
    confidence = torch.tensor([[0.99, 0.99, 0.1], [0.5, 0.5, 0.5]])
    # Survivals in order: .99, .98, .5, .25, .125, .098; Theta = (2 + sum) / (1.1 + 0.05 (B - 1)):
    # 1.74, 2.49, 3.18, 3.44, 3.50, then 3.46 -> stop after four admissions.
    via_model = schedule_prefix(confidence, model, mode="causal")
    via_table = schedule_prefix(confidence, model.sps_table(8, 2), mode="causal")
    assert via_model.tolist() == via_table.tolist() == [2, 2]
    with pytest.raises(ValueError, match="earlier round"):
        schedule_prefix(confidence, model, mode="budget")
    assert schedule_prefix(confidence, model, mode="budget", earlier_confidence=confidence).tolist() == [2, 2]
    assert schedule_prefix(confidence, model, mode="budget", budget=3).tolist() == [2, 1]
    ascend = analytic_cost_model(device_spec("ascend-910b"), ModelSpec.from_configs(QWEN3_8B))
    long_block = torch.full((1, 20), 0.999)
    assert schedule_prefix(long_block, ascend, mode="fixed").max() <= 15      # gamma + 1 <= 16 on Ascend
