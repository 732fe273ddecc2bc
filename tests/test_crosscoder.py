"""The crosscoder package on planted data: recovery, determinism, gradients, checkpoints, bad input."""

from __future__ import annotations

import copy
import math
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import crosscoder.methods
import crosscoder.model
import crosscoder.sparse_codes
from crosscoder import CrossCoder, CrossCoderConfig, InputError, TrainingError, evaluate, fit
from crosscoder.resampling import resample_dead
from crosscoder.sparse_codes import SparseCodes, sparse_decode
from crosscoder.sparsity import decoder_and_norms, jumprelu
from crosscoder.synthetic import planted_features, planted_recovery
from crosscoder.trainer import make_optimizer, resamples_at

SMALL = CrossCoderConfig(expansion_ratio=4, batch_size=256, n_steps=1200, log_every=100, device="cpu")
# The tests of the training arithmetic run on every device this machine has: CI has only the CPU, a GPU
# machine runs them on CUDA too (`pytest --noconftest tests/test_crosscoder.py -k cuda` there).
DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(scope="module")
def planted():
    return planted_features(n_tokens=30_000, n_snapshots=4, d_model=32, n_features=48, seed=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparsity", ["jumprelu", "l1"])
def test_planted_features_are_recovered_with_their_snapshots(planted, sparsity, device):
    result = fit(planted.activations, replace(SMALL, sparsity=sparsity, device=device))
    recovery = planted_recovery(planted, result.model.decoder_weight.cpu())
    assert recovery.recovered_share >= 0.9, recovery
    assert recovery.onsets_exact_share == 1.0, recovery
    assert result.metrics.explained_variance > 0.95


def test_the_untrained_crosscoder_does_not_start_on_the_planted_directions(planted):
    """The planted set and the crosscoder's initialisation draw from different generators: with one
    seed for both, the initial decoder was the planted dictionary and every recovery test passed."""
    untrained = fit(planted.activations, replace(SMALL, n_steps=1)).initial_model
    recovery = planted_recovery(planted, untrained.decoder_weight)
    assert recovery.recovered_share == 0.0, recovery
    # Emerging and fading features are both in the set, so onsets are tested.
    assert (planted.first_snapshot > 0).any() and (planted.last_snapshot < 3).any()


@pytest.mark.parametrize("sparsity", list(crosscoder.methods.METHODS))
def test_the_initial_norm_is_the_candidate_with_the_lowest_error(planted, sparsity):
    """Initialisation prices every candidate decoder norm from one forward pass (the reconstruction scales as
    norm²); a forward pass at each candidate's own weights finds the same norm the lowest."""
    config = replace(SMALL, sparsity=sparsity, k=8)
    model = CrossCoder(4, 32, config)
    sample = planted.activations[: config.normalisation_tokens]
    model.initialize(sample, torch.Generator().manual_seed(0))
    chosen = model.decoder_weight.norm(dim=-1)[0, 0].item()
    subset = sample[: config.initialization_tokens]
    errors = {}
    for candidate in torch.logspace(-2, 1, 16).tolist():
        scaled = copy.deepcopy(model)
        scale = candidate / chosen
        with torch.no_grad():
            scaled.decoder_weight.mul_(scale)
            scaled.encoder_weight.mul_(scale)
            if scaled.log_threshold is not None:
                scaled.log_threshold.add_(2 * math.log(scale))
            error = (scaled(subset).reconstruction - scaled.normalise(subset)).square().sum(-1).mean().item()
        errors[candidate] = error
    assert min(errors, key=errors.get) == pytest.approx(chosen, rel=1e-5), errors
    assert sorted(errors.values())[0] < sorted(errors.values())[1]


@pytest.mark.parametrize("sparsity", ["jumprelu", "l1"])
def test_resampled_dead_features_fire_on_the_worst_reconstructed_tokens(planted, sparsity):
    model = fit(planted.activations, replace(SMALL, sparsity=sparsity, n_steps=200)).model.train()
    optimizer = make_optimizer(model)
    batch = planted.activations[:512]
    model(batch).reconstruction.square().sum().backward()
    optimizer.step()  # Adam's moments now exist for every weight
    dead = torch.zeros(model.n_features, dtype=torch.bool)
    dead[:5] = True
    with torch.no_grad():  # silence five features: they fire on no token
        model.encoder_weight[dead] = 0.0
        model.encoder_bias[dead] = -1.0
    assert not model.feature_activations(batch)[:, dead].any()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        errors = (model.normalise(batch) - model(batch).reconstruction).square().sum((1, 2))

    assert resample_dead(model, optimizer, batch, dead, torch.Generator().manual_seed(0)) == 5
    fires = model.feature_activations(batch)[:, dead] > 0
    assert fires.any(0).all()  # each new feature fires on some token of the batch it was drawn from
    # Its tokens include one the crosscoder reconstructed badly: above the batch's median error.
    assert all(errors[fires[:, index]].max() > errors.median() for index in range(5))
    after = model.state_dict()
    assert all(torch.equal(before[name][~dead], after[name][~dead]) for name in ("encoder_weight", "decoder_weight"))
    for parameter in (model.encoder_weight, model.decoder_weight):
        state = optimizer.state[parameter]
        assert state["exp_avg"][dead].abs().sum() == 0 and state["exp_avg"][~dead].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse_step_max_density", [0.0, 1.0], ids=["dense", "sparse"])
def test_same_seed_same_weights_other_seed_other_weights(planted, sparse_step_max_density, device):
    # Resampling every 20 steps: its token draw is seeded too.
    config = replace(
        SMALL, n_steps=60, sparse_step_max_density=sparse_step_max_density, resample_dead_every=20, device=device
    )
    first = fit(planted.activations, config).model.state_dict()
    second = fit(planted.activations, config).model.state_dict()
    other = fit(planted.activations, replace(config, seed=1)).model.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["decoder_weight"], other["decoder_weight"])


@pytest.mark.parametrize("device", DEVICES)
def test_jumprelu_gradients_match_a_plain_autograd_reference(device):
    torch.manual_seed(0)
    bandwidth, c = 0.5, 4.0
    like = {"dtype": torch.float64, "device": device}
    pre = torch.randn(16, 10, **like).requires_grad_()
    norms = (torch.rand(3, 10, **like) + 0.5).requires_grad_()
    log_threshold = torch.full((10,), -0.5, **like, requires_grad=True)
    upstream_codes, upstream_frequency = torch.randn(3, 16, 10, **like), torch.randn(10, **like)

    entries, frequency = jumprelu(pre, norms.T, log_threshold, bandwidth, c)  # it takes norms feature-major
    codes = torch.zeros(3, 16, 10, **like).index_put(
        (entries.snapshots, entries.tokens, entries.features), entries.values
    )
    ((codes * upstream_codes).sum() + (frequency * upstream_frequency).sum()).backward()
    custom = [tensor.grad.clone() for tensor in (pre, norms, log_threshold)]

    for tensor in (pre, norms, log_threshold):
        tensor.grad = None
    threshold = log_threshold.exp().expand(3, 16, 10)
    scaled = pre[None] * norms[:, None]
    gate = (scaled > threshold).double()
    window = ((scaled - threshold).abs() < bandwidth / 2).double()
    # Value: the step; gradient: only to the threshold, -window / bandwidth.
    step = gate + (-window / bandwidth) * (threshold - threshold.detach())
    reference_codes = pre[None] * gate + pre.detach()[None] * (step - gate.detach())
    reference_frequency = torch.tanh(c * reference_codes * norms[:, None]).mean((0, 1))
    assert torch.allclose(reference_codes, codes) and torch.allclose(reference_frequency, frequency)
    ((reference_codes * upstream_codes).sum() + (reference_frequency * upstream_frequency).sum()).backward()
    for mine, theirs in zip(custom, (pre.grad, norms.grad, log_threshold.grad)):
        assert torch.allclose(mine, theirs, atol=1e-12)
    assert custom[2].abs().sum() > 0  # the threshold did get a gradient


@pytest.mark.parametrize("uses", ["both", "norms", "decoder"])
def test_decoder_and_norms_gradient_is_plain_autograds(uses):
    """The decoder's gradient and its norms' gradient are added in one backward: the sum autograd gives."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 3, 5, generator=generator, dtype=torch.float64)
    upstream_decoder, upstream_norms = (
        torch.randn(6, 3, 5, generator=generator, dtype=torch.float64),
        torch.randn(6, 3, generator=generator, dtype=torch.float64),
    )
    gradients = []
    for function in (decoder_and_norms, lambda w: (w, w.norm(dim=-1))):
        leaf = weight.clone().requires_grad_()
        decoder, norms = function(leaf)
        terms = {"decoder": (decoder * upstream_decoder).sum(), "norms": (norms * upstream_norms).sum()}
        sum(terms.values() if uses == "both" else [terms[uses]]).backward()
        gradients.append(leaf.grad)
    assert torch.allclose(gradients[0], gradients[1], atol=1e-12)


def loss_and_gradients(model: CrossCoder, batch: torch.Tensor, max_density: float):
    model.config = replace(model.config, sparse_step_max_density=max_density)
    model.zero_grad()
    output = model(batch)
    loss = (output.reconstruction - model.normalise(batch)).square().mean() + 0.1 * output.sparsity_penalty
    loss.backward()
    assert output.codes.is_sparse == (max_density >= 1)  # the path asked for is the one taken
    return loss.item(), {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


def test_the_default_crossover_is_the_devices_own(planted, monkeypatch):
    """Left unset, the crossover to the sparse step is the entry for the device's dense products and the
    method's code layout: shared codes (topk at 6 of 128 features firing) go sparse below their entry and
    not above it; JumpReLU reads the per-snapshot entry alone; a device with no entry (CUDA) stays dense."""
    kind = crosscoder.model.matmul_kind("cpu")
    monkeypatch.setitem(crosscoder.methods.SPARSE_STEP_MAX_DENSITY, kind, {"shared": 0.1, "per_snapshot": 0.01})
    model = CrossCoder(4, 32, replace(SMALL, sparsity="topk", k=6))
    model.initialize(planted.activations[:4096], torch.Generator().manual_seed(0))
    batch = planted.activations[:512]
    assert model.config.sparse_step_max_density is None
    assert model(batch).codes.is_sparse
    monkeypatch.setitem(crosscoder.methods.SPARSE_STEP_MAX_DENSITY, kind, {"shared": 0.04, "per_snapshot": 1.0})
    assert not model(batch).codes.is_sparse
    monkeypatch.delitem(crosscoder.methods.SPARSE_STEP_MAX_DENSITY, kind)
    assert not model(batch).codes.is_sparse
    model.config = replace(model.config, sparse_step_max_density=1.0)  # a value in the config wins
    assert model(batch).codes.is_sparse

    jumprelu_model = CrossCoder(4, 32, replace(SMALL, sparsity="jumprelu"))
    jumprelu_model.initialize(planted.activations[:4096], torch.Generator().manual_seed(0))
    monkeypatch.setitem(crosscoder.methods.SPARSE_STEP_MAX_DENSITY, kind, {"shared": 1.0, "per_snapshot": 0.0})
    assert not jumprelu_model(batch).codes.is_sparse
    monkeypatch.setitem(crosscoder.methods.SPARSE_STEP_MAX_DENSITY, kind, {"shared": 0.0, "per_snapshot": 1.0})
    assert jumprelu_model(batch).codes.is_sparse


def test_each_kind_of_cpu_product_has_its_own_crossover(monkeypatch):
    """AMX marks a CPU whose dense products are faster, in float32 and far more in bf16 (its tiles), while
    the sparse products stay float32: each of the four kinds reads its own entry, bf16 below float32 on the
    same CPU and the AMX CPU below the other in the same dtype."""
    table = crosscoder.methods.SPARSE_STEP_MAX_DENSITY
    for has_amx, prefix in ((True, "cpu-amx"), (False, "cpu")):
        monkeypatch.setattr(crosscoder.model, "cpu_has_amx_bf16", lambda has_amx=has_amx: has_amx)
        assert crosscoder.model.matmul_kind("cpu") == prefix
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert crosscoder.model.matmul_kind("cpu") == f"{prefix}-bf16"
            assert crosscoder.model.matmul_kind("cuda") == "cuda"
    for layout in ("shared", "per_snapshot"):
        assert table["cpu-amx-bf16"][layout] < table["cpu-amx"][layout] < table["cpu"][layout]
        assert table["cpu-amx-bf16"][layout] < table["cpu-bf16"][layout] < table["cpu"][layout]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparsity", list(crosscoder.methods.METHODS))
@pytest.mark.parametrize("codes", ["initial", "trained"])
def test_sparse_step_gives_the_dense_loss_and_gradients(planted, sparsity, codes, device):
    config = replace(SMALL, sparsity=sparsity, k=4, n_steps=300, device=device)
    if codes == "trained":
        model = fit(planted.activations, config).model.train()
    else:
        model = CrossCoder(4, 32, config)
        model.initialize(planted.activations[:4096], torch.Generator().manual_seed(0))
        model.to(device)
    batch = planted.activations[:512].to(device)
    dense_loss, dense = loss_and_gradients(model, batch, 0.0)
    sparse_loss, sparse = loss_and_gradients(model, batch, 1.0)
    # Above a crossover the step falls back to dense through the sparse step's encoder.
    fallback_loss, fallback = loss_and_gradients(model, batch, 1e-9)
    assert sparse_loss == pytest.approx(dense_loss, rel=1e-6)
    assert fallback_loss == pytest.approx(dense_loss, rel=1e-6)
    for name, gradient in dense.items():
        assert gradient.abs().max() > 0, name  # every parameter is tested where it has a gradient
        for step, other in (("sparse", sparse), ("fallback", fallback)):
            error = (other[name] - gradient).abs().max() / gradient.abs().max()
            assert error < 1e-5, f"{step} {name}: relative error {error:.1e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "column_block", [None, crosscoder.sparse_codes.GATHER_COLUMN_BLOCK], ids=["one-pass", "blocks"]
)
def test_sparse_decode_gives_the_dense_product_and_gradients(column_block, device):
    """Codes as entries against the same codes as a dense matrix, the decoder gathered in one pass or in
    column blocks (a width of 200 is no multiple of the block: the last one is partial)."""
    generator = torch.Generator().manual_seed(0)
    n_rows, n_columns, width = 50, 300, 200
    fires = torch.rand(n_rows, n_columns, generator=generator) < 0.05
    dense_codes = torch.randn(n_rows, n_columns, generator=generator) * fires
    dense_codes[fires.nonzero()[::7].unbind(1)] = 0.0  # entries with code 0 (JumpReLU's window) add nothing
    rows, columns = fires.nonzero(as_tuple=True)
    decoder = torch.randn(n_columns, width, generator=generator).to(device)
    values = dense_codes[rows, columns].to(device).requires_grad_()
    sparse_decoder = decoder.clone().requires_grad_()
    codes = SparseCodes(values, rows.to(device), columns.to(device), n_rows)
    sparse_out = sparse_decode(codes, sparse_decoder, column_block)
    dense_matrix, dense_decoder = dense_codes.to(device).requires_grad_(), decoder.clone().requires_grad_()
    dense_out = dense_matrix @ dense_decoder
    assert torch.allclose(sparse_out, dense_out, atol=1e-5)
    grad_output = torch.randn(n_rows, width, generator=generator).to(device)
    (sparse_out * grad_output).sum().backward()
    (dense_out * grad_output).sum().backward()
    assert torch.allclose(values.grad, dense_matrix.grad[rows, columns], atol=1e-4)
    assert torch.allclose(sparse_decoder.grad, dense_decoder.grad, atol=1e-4)


def test_killed_training_resumes_to_the_same_weights(planted, tmp_path):
    data = tmp_path / "planted.pt"
    torch.save(planted.activations[:8192], data)
    config = replace(SMALL, sparsity="jumprelu", n_steps=800, checkpoint_every=25, checkpoint_dir=str(tmp_path / "run"))
    script = textwrap.dedent(
        f"""
        import torch
        from crosscoder import CrossCoderConfig, fit
        fit(torch.load({str(data)!r}), CrossCoderConfig.from_dict({config.to_dict()!r}))
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parent.parent)
    deadline = time.time() + 120
    while not any(Path(config.checkpoint_dir).glob("step*.safetensors")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = [int(path.stem[4:]) for path in Path(config.checkpoint_dir).glob("step*.safetensors")]
    assert written and max(written) < config.n_steps, "the run finished before it could be killed"

    resumed = fit(torch.load(data), config)
    straight = fit(torch.load(data), replace(config, checkpoint_dir=str(tmp_path / "straight")))
    assert resumed.history[-1]["step"] == config.n_steps
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_diverging_loss_names_the_step_and_the_checkpoint(planted, tmp_path):
    config = replace(SMALL, learning_rate=1e30, checkpoint_every=1, checkpoint_dir=str(tmp_path))
    with pytest.raises(
        TrainingError, match=r"loss became (nan|inf) at step \d+; last good checkpoint: .*step\d+\.safetensors"
    ):
        fit(planted.activations, config)


@pytest.mark.parametrize(
    "make_data, config, message",
    [
        (lambda: torch.randn(100, 32), SMALL, "shape \\[tokens, snapshots, d_model\\]"),
        (lambda: torch.full((300, 2, 8), float("nan")), SMALL, "NaN or inf"),
        (lambda: torch.randn(300, 2, 8), {"expansion_ratio": 0}, "expansion_ratio must be > 0"),
        (
            lambda: torch.randn(300, 2, 8),
            {"sparsity": "topk", "k": 32, "expansion_ratio": 4},
            "k = 32 must be below n_features = 32",
        ),
        (lambda: torch.randn(300, 2, 8), {"sparsity": "relu6"}, "sparsity 'relu6' is unknown"),
        (lambda: torch.randn(100, 2, 8), {"batch_size": 256}, "batch_size 256 exceeds the 100 tokens"),
    ],
)
def test_bad_input_fails_before_training(make_data, config, message):
    with pytest.raises(InputError, match=message):
        fit(make_data(), config if isinstance(config, CrossCoderConfig) else replace(SMALL, **config))


def test_infinite_value_is_located():
    data = torch.randn(300, 2, 8)
    data[123, 1, 4] = float("inf")
    with pytest.raises(InputError, match="first at token 123"):
        fit(data, replace(SMALL, batch_size=64))


def test_save_and_load_round_trip(planted, tmp_path):
    model = fit(planted.activations, replace(SMALL, n_steps=30)).model
    model.save(tmp_path / "crosscoder.safetensors")
    loaded = CrossCoder.load(tmp_path / "crosscoder.safetensors")
    batch = planted.activations[:64]
    assert loaded.config == model.config
    assert torch.equal(loaded(batch).reconstruction, model(batch).reconstruction)
    assert torch.equal(loaded.input_scale, model.input_scale)

    # A file written before the encoder was stored feature-major ([S*d, F], no layout in its metadata).
    with safe_open(str(tmp_path / "crosscoder.safetensors"), framework="pt") as handle:
        metadata = {key: value for key, value in handle.metadata().items() if key != "encoder_layout"}
        state = {name: handle.get_tensor(name) for name in handle.keys()}
    state["encoder_weight"] = state["encoder_weight"].T.contiguous()
    save_file(state, str(tmp_path / "old.safetensors"), metadata=metadata)
    assert torch.equal(CrossCoder.load(tmp_path / "old.safetensors")(batch).reconstruction, model(batch).reconstruction)


def test_metrics_match_a_direct_computation(planted):
    result = fit(planted.activations, replace(SMALL, sparsity="topk", k=6, n_steps=200))
    held_out = planted.activations[-3000:]
    metrics = evaluate(result.model, held_out, batch_size=700)
    with torch.no_grad():
        output = result.model(held_out)
        target = result.model.normalise(held_out)
    error = (output.reconstruction - target).square().sum((0, 2))
    variance = (target - target.mean(0)).square().sum((0, 2))
    assert metrics.explained_variance_per_snapshot == pytest.approx((1 - error / variance).tolist(), abs=1e-4)
    assert metrics.l0 == pytest.approx(6.0)
    assert metrics.activation_frequency.tolist() == pytest.approx((output.codes != 0).float().mean(0).tolist())
    assert metrics.dead_fraction == pytest.approx(((output.codes != 0).sum(0) == 0).float().mean().item())
    assert metrics.decoder_norms.shape == (result.model.n_features, 4)
    # Normalisation: each snapshot's mean norm becomes sqrt(d_model).
    assert target.norm(dim=-1).mean(0).tolist() == pytest.approx([32**0.5] * 4, rel=0.05)


def test_iterable_of_batches_trains_like_an_array(planted):
    batches = (planted.activations[start : start + 256] for start in range(0, 20_000, 256))
    result = fit(batches, replace(SMALL, sparsity="batchtopk", k=4, n_steps=70, normalisation_tokens=1024))
    assert result.history[-1]["step"] == 70
    assert result.metrics.explained_variance > 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_autocast_trains_close_to_float32(planted, device):
    config = replace(SMALL, sparsity="jumprelu", n_steps=400, device=device)
    full = fit(planted.activations, config).metrics.explained_variance
    half = fit(planted.activations, replace(config, autocast_bf16=True)).metrics.explained_variance
    assert half > 0.9 and abs(full - half) < 0.03


@pytest.mark.parametrize("sparsity", ["l1", "jumprelu"])
def test_the_loss_does_not_depend_on_the_snapshot_count(sparsity):
    """The same crosscoder seen through 5 or 17 identical snapshots: the same reconstruction error and the
    same penalty, so one sparsity coefficient means the same thing for any snapshot count (the
    n_snapshots axis would otherwise sweep sparsity too)."""
    generator = torch.Generator().manual_seed(0)
    d_model, n_features = 16, 32
    tokens = torch.randn(256, d_model, generator=generator)
    encoder = torch.randn(d_model, n_features, generator=generator) / d_model**0.5
    decoder = torch.randn(n_features, d_model, generator=generator) / d_model**0.5
    losses = []
    for n_snapshots in (5, 17):
        model = CrossCoder(n_snapshots, d_model, CrossCoderConfig(expansion_ratio=2, sparsity=sparsity))
        with torch.no_grad():
            model.encoder_weight.copy_((encoder.T / n_snapshots).repeat(1, n_snapshots))  # the same pre-activation
            model.decoder_weight.copy_(decoder[:, None].expand(-1, n_snapshots, -1))
            if model.log_threshold is not None:
                model.log_threshold.fill_(-3.0)
        batch = tokens[:, None].expand(-1, n_snapshots, -1)
        output = model(batch)
        mse = (output.reconstruction - model.normalise(batch)).square().sum(-1).mean() / d_model
        losses.append((mse.item(), output.sparsity_penalty.item()))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[0][1] > 0  # the penalty is not trivially zero


def test_history_entries_are_means_over_their_logging_window(planted):
    """Each entry's losses average the steps since the previous entry: one batch's loss is too noisy for
    the convergence figure read off them."""
    config = replace(SMALL, n_steps=12, device="cpu")
    every_step = fit(planted.activations, replace(config, log_every=1), progress=False).history
    windowed = fit(planted.activations, replace(config, log_every=4), progress=False).history
    assert [entry["step"] for entry in windowed] == [4, 8, 12]
    for entry in windowed:
        window = every_step[entry["step"] - 4 : entry["step"]]
        for key in ("loss", "mse", "sparsity_penalty"):
            assert entry[key] == pytest.approx(sum(step[key] for step in window) / 4, rel=1e-5)
    assert windowed[0]["loss"] != pytest.approx(every_step[3]["loss"], rel=1e-5)  # not the last step's alone


def test_no_resampling_in_the_cooldown_or_the_last_two_fifths():
    """A feature re-aimed just before the last fifth would make loss_drop_last_fifth measure its recovery."""
    config = replace(SMALL, n_steps=1000, resample_dead_every=250, lr_cooldown_fraction=0.2)
    assert [step + 1 for step in range(1000) if resamples_at(step, config)] == [250, 500]
    longer_cooldown = replace(config, lr_cooldown_fraction=0.5)
    assert [step + 1 for step in range(1000) if resamples_at(step, longer_cooldown)] == [250]
    # With a target L0, JumpReLU's slow controller needs the last half to answer the resampled features' burst.
    assert [step + 1 for step in range(1000) if resamples_at(step, replace(config, target_l0=8, sparsity="l1"))] == [
        250,
        500,
    ]
    targeted = replace(config, target_l0=8, sparsity="jumprelu")
    assert [step + 1 for step in range(1000) if resamples_at(step, targeted)] == [250]
    assert [step + 1 for step in range(2000) if resamples_at(step, replace(targeted, n_steps=2000))] == [250, 500, 750]


def test_every_sparsity_method_is_declared_once_and_named_in_the_config_type():
    import typing

    from crosscoder.methods import METHODS, SPARSE_STEP_MAX_DENSITY, SparsityName

    assert set(typing.get_args(SparsityName)) == set(METHODS)
    for name, method in METHODS.items():
        config = CrossCoderConfig(sparsity=name)
        assert config.lambda_ == method.default_coefficient
        model = CrossCoder(2, 8, config)
        assert (model.log_threshold is not None) == (method.layout == "per_snapshot")
        assert all(method.layout in row for row in SPARSE_STEP_MAX_DENSITY.values())
        if method.uses_k:  # k at the dictionary's size is refused before training
            with pytest.raises(InputError):
                CrossCoder(2, 8, CrossCoderConfig(sparsity=name, expansion_ratio=1, k=8))
    with pytest.raises(InputError, match="unknown"):
        CrossCoderConfig(sparsity="gated")  # type: ignore[arg-type]
