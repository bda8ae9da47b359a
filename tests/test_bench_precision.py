"""The precision bench changes nothing but the precision between its arms (bf16 autocast runs on CPU too)."""
import torch

from advcl_dist.bench.precision import advcl_method, attack_batch, compare_attacks, robust_flags, table


def test_arms_differ_only_in_precision(tmp_path):
    torch.manual_seed(0)
    method = advcl_method(width=4, size=16, cache=tmp_path, device=torch.device("cpu"))
    model = method.build_model().train()
    batch = attack_batch(method, batch=8, seed=0)
    # Two fp32 arms: the same weights, batch and random starts give the same δ, δ_ce and gains.
    same = compare_attacks(method, model, batch, arms=(False, False))
    for row in same.values():
        assert row["x_adv_diff_over_eps"] == 0 and row["fp32"]["gain"] == row["bf16"]["gain"]
        assert row["gain_ratio"] == 1.0 and row["fp32"]["gain"] > 0  # PGD raised the fp32 loss
    # fp32 against bf16 autocast: the perturbations move apart, the scoring (fp32, at x) is shared.
    mixed = compare_attacks(method, model, batch)
    for name, row in mixed.items():
        assert row["x_adv_diff_over_eps"] > 0
        assert row["loss_at_x"] == same[name]["loss_at_x"] and row["fp32"]["gain"] == same[name]["fp32"]["gain"]
        assert row["bf16"]["own_initial_loss"] != row["fp32"]["own_initial_loss"]  # computed under autocast


def test_robust_flags():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval()
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6)

    def attack(eps):
        return type("Attack", (), {"eps": eps, "step_size": eps / 4, "eval_steps": 3, "random_start": True})

    flags = robust_flags(model, x, y, range(6), attack(8 / 255), seed=1, bf16=True)
    assert flags.dtype == torch.bool and flags.shape == (6,)
    assert torch.equal(flags, robust_flags(model, x, y, range(6), attack(8 / 255), seed=1, bf16=True))
    unmoved = robust_flags(model, x, y, range(6), attack(0.0), seed=1, bf16=True)
    assert torch.equal(unmoved, model(x).argmax(1) == y)  # ε = 0 leaves x alone: robust = correct, scored in fp32


def test_table_reads_the_report():
    row = {"gain_ratio": 0.5, "x_adv_diff_over_eps": 0.25, "fp32": {"gain": 2.0}, "bf16": {"gain": 1.0}}
    report = {"attacks": {"delta": row, "delta_ce": {**row, "gain_ratio": None}}, "attack_batch": 8,
              "config": {"eval_steps": 20},
              "pgd20": {"images": 10, "SA": 90.0, "fp32": {"RA": 50.0}, "bf16": {"RA": 40.0}, "ra_diff_pp": -10.0,
                        "flags_differ": 1}}
    text = table(report)
    assert "| δ: contrastive loss gain (batch 8) | 2.0000 | 1.0000 | 0.500× | 0.250 |" in text
    assert "| – |" in text.splitlines()[3] and "-10.00 pp (1 images differ)" in text
