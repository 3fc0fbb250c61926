"""Schedulers: parity with diffusers' PyTorch schedulers, step by step, eager and inside one jit."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from dynamicid_jax.schedulers import (SD15_SCHEDULER_CONFIG, DDIMScheduler, DPMSolverMultistepScheduler,
                                      EulerDiscreteScheduler, SchedulerConfigError, load_scheduler)

SHAPE = (2, 4, 4, 4)  # NHWC; the schedulers are elementwise, so diffusers sees the same array
SD15_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear"}
CLASS_NAMES = {"ddim": "DDIMScheduler", "dpm++2m": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}
OURS = {"ddim": DDIMScheduler, "dpm++2m": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}


@pytest.fixture(scope="session")
def diffusers(torch):
    import diffusers as _diffusers
    return _diffusers


@pytest.fixture(scope="session")
def arrays():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    fixed_eps = rng.standard_normal(SHAPE).astype(np.float32)
    return noise, fixed_eps


def base_config(kind, **overrides):
    if kind == "ddim":
        cfg = dict(SD15_SCHEDULER_CONFIG)
    else:
        cfg = {"_class_name": CLASS_NAMES[kind], **SD15_BETAS, "steps_offset": 1}
    cfg.update(overrides)
    return cfg


# ----------------------------------------------------------------------------------------- the three loops
# fake model: eps_hat(x, t) = 0.1 x + sin(t / 100) · fixed_eps, in float32 on both sides

def torch_run(torch, tsched, n, noise, fixed_eps, step_kwargs=None):
    tsched.set_timesteps(n)
    eps_t = torch.from_numpy(fixed_eps)
    x = torch.from_numpy(noise) * tsched.init_noise_sigma
    traj = []
    for i, t in enumerate(tsched.timesteps):
        inp = tsched.scale_model_input(x, t)
        out = 0.1 * inp + torch.sin(t.to(torch.float32) / 100) * eps_t
        x = tsched.step(out, t, x, **(step_kwargs(i) if step_kwargs else {})).prev_sample
        traj.append(x.numpy())
    return tsched.timesteps.numpy(), float(tsched.init_noise_sigma), np.stack(traj)


def fake_model(inp, t, fixed_eps):
    return 0.1 * inp + jnp.sin(jnp.asarray(t, jnp.float32) / 100) * fixed_eps


def ours_eager(sched, n, noise, fixed_eps, step_kwargs=None):
    state = sched.set_timesteps(n, sample_shape=noise.shape)
    x = jnp.asarray(noise) * state.init_noise_sigma
    traj = []
    for i in range(n):
        idx = jnp.int32(i)
        inp = sched.scale_model_input(state, x, idx)
        out = fake_model(inp, state.timesteps[idx], fixed_eps)
        x, state = sched.step(state, out, idx, x, **(step_kwargs(i) if step_kwargs else {}))
        traj.append(np.asarray(x))
    return state, np.stack(traj)


@functools.partial(jax.jit, static_argnums=0)
def ours_jit(sched, state, noise, fixed_eps):
    n = state.timesteps.shape[0]

    def body(i, carry):
        x, st, traj = carry
        inp = sched.scale_model_input(st, x, i)
        out = fake_model(inp, st.timesteps[i], fixed_eps)
        x, st = sched.step(st, out, i, x)
        return x, st, traj.at[i].set(x)

    init = (noise * state.init_noise_sigma, state, jnp.zeros((n,) + noise.shape, jnp.float32))
    return jax.lax.fori_loop(0, n, body, init)[2]


def check_parity(torch, diffusers, kind, cfg, n, arrays, eager=True, jit=True):
    """diffusers vs ours (eager loop and/or one jit + fori_loop): timesteps, init sigma, every step."""
    noise, fixed_eps = arrays
    tsched = getattr(diffusers, CLASS_NAMES[kind]).from_config(cfg)
    t_ts, t_init, t_traj = torch_run(torch, tsched, n, noise, fixed_eps)
    sched = load_scheduler(cfg, kind=kind)
    assert type(sched) is OURS[kind]
    state = sched.set_timesteps(n, sample_shape=SHAPE)
    if kind == "euler" and sched.config.use_karras_sigmas:
        # fractional t = f(sigma); torch's float32 sqrt (in diffusers' train sigmas) is not correctly rounded
        # on every CPU, so these can differ in the last bit
        assert_close(state.timesteps, t_ts, atol=0, rtol=2e-6, what="euler karras timesteps")
    else:
        np.testing.assert_array_equal(np.asarray(state.timesteps), t_ts, err_msg=f"{kind} timesteps")
    assert state.timesteps.dtype == (jnp.float32 if kind == "euler" else jnp.int32)
    assert_close(state.init_noise_sigma, t_init, atol=1e-6, rtol=1e-6, what=f"{kind} init_noise_sigma")
    if eager:
        _, traj = ours_eager(sched, n, noise, fixed_eps)
        assert_close(traj, t_traj, atol=1e-4, rtol=1e-4, what=f"{kind} eager trajectory vs diffusers")
    if jit:
        jit_traj = ours_jit(sched, state, jnp.asarray(noise), jnp.asarray(fixed_eps))
        assert_close(jit_traj, t_traj, atol=1e-4, rtol=1e-4, what=f"{kind} jit trajectory vs diffusers")
        if eager:
            assert_close(jit_traj, traj, atol=1e-5, rtol=1e-5, what=f"{kind} jit+fori_loop vs eager")


@pytest.mark.parametrize("n", [10, 25, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", ["ddim", "dpm++2m", "euler"])
def test_trajectory_parity(torch, diffusers, arrays, kind, prediction_type, n):
    """SD1.5 betas, each scheduler's diffusers defaults: every step of the trajectory matches."""
    check_parity(torch, diffusers, kind, base_config(kind, prediction_type=prediction_type), n, arrays)


VARIANTS = [
    # DDIM: spacings, clipping, final alpha, cosine betas, x0 prediction, zero-terminal-SNR
    ("ddim", dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"), 10),
    ("ddim", dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, timestep_spacing="linspace",
                  clip_sample=True, clip_sample_range=0.5, set_alpha_to_one=True), 25),
    ("ddim", dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=True), 20),
    ("ddim", dict(steps_offset=0, num_train_timesteps=500), 7),
    # DPM-Solver++ 2M: final sigma, Karras, spacings, heun, first order, euler_at_final, lambda clipping
    ("dpm++2m", dict(final_sigmas_type="sigma_min"), 25),
    ("dpm++2m", dict(final_sigmas_type="sigma_min", prediction_type="v_prediction"), 10),
    ("dpm++2m", dict(use_karras_sigmas=True), 20),
    ("dpm++2m", dict(use_karras_sigmas=True, prediction_type="v_prediction", final_sigmas_type="sigma_min"), 15),
    ("dpm++2m", dict(timestep_spacing="leading"), 25),
    ("dpm++2m", dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"), 20),
    ("dpm++2m", dict(solver_type="heun", final_sigmas_type="sigma_min", lower_order_final=False), 12),
    ("dpm++2m", dict(solver_order=1), 10),
    ("dpm++2m", dict(euler_at_final=True, final_sigmas_type="sigma_min", lambda_min_clipped=-5.1), 20),
    ("dpm++2m", dict(prediction_type="sample", beta_schedule="linear", beta_start=1e-4, beta_end=0.02), 16),
    # Euler: leading (init sigma sqrt(max² + 1)), trailing, Karras (fractional t), sigma_min final, zero SNR
    ("euler", dict(timestep_spacing="leading"), 25),
    ("euler", dict(timestep_spacing="trailing", prediction_type="v_prediction"), 10),
    ("euler", dict(use_karras_sigmas=True), 20),
    ("euler", dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, final_sigmas_type="sigma_min"), 15),
    ("euler", dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"), 12),
    ("euler", dict(prediction_type="sample", beta_schedule="linear", beta_start=1e-4, beta_end=0.02), 18),
]


@pytest.mark.parametrize("kind,overrides,n", VARIANTS, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(VARIANTS)])
def test_config_variant_parity(torch, diffusers, arrays, kind, overrides, n):
    """The other supported config fields: timesteps exact, trajectory within 1e-4 (jitted loop)."""
    check_parity(torch, diffusers, kind, base_config(kind, **overrides), n, arrays, eager=False)


def test_ddim_eta_parity(torch, diffusers, arrays):
    """η > 0: the same per-step noise (from our keys) passed to diffusers as variance_noise."""
    noise, fixed_eps = arrays
    cfg, n, eta = base_config("ddim"), 10, 0.7
    key = jax.random.PRNGKey(3)
    step_noise = [np.asarray(jax.random.normal(jax.random.fold_in(key, i), SHAPE, jnp.float32)) for i in range(n)]
    tsched = diffusers.DDIMScheduler.from_config(cfg)
    _, _, t_traj = torch_run(torch, tsched, n, noise, fixed_eps,
                             lambda i: {"eta": eta, "variance_noise": torch.from_numpy(step_noise[i])})
    sched = load_scheduler(cfg)
    _, traj = ours_eager(sched, n, noise, fixed_eps, lambda i: {"eta": eta, "key": jax.random.fold_in(key, i)})
    assert_close(traj, t_traj, atol=1e-4, rtol=1e-4, what="DDIM eta=0.7 trajectory")
    state = sched.set_timesteps(n)
    x = jnp.asarray(noise)
    with pytest.raises(ValueError, match="key"):
        sched.step(state, x, 0, x, eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        sched.step(state, x, 0, x, eta=-1.0)


@pytest.mark.parametrize("kind", ["ddim", "dpm++2m", "euler"])
def test_add_noise_and_velocity(torch, diffusers, kind):
    """Training forward process vs diffusers (DDIM's add_noise/get_velocity; DPM's add_noise at its own
    timesteps, which is the same process), int32 [B] timesteps broadcast over NHWC, eager and jitted."""
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    noise = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    t = np.array([0, 500, 999], np.int32)
    cfg = base_config(kind)
    sched = load_scheduler(cfg, kind=kind)
    ref = diffusers.DDIMScheduler.from_config(base_config("ddim"))
    tt = torch.from_numpy(t.astype(np.int64))
    want_noisy = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    for fn in (sched.add_noise, jax.jit(sched.add_noise)):
        assert_close(fn(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), want_noisy, atol=1e-5, rtol=1e-5,
                     what=f"{kind} add_noise")
    for fn in (sched.get_velocity, jax.jit(sched.get_velocity)):
        assert_close(fn(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), want_v, atol=1e-5, rtol=1e-5,
                     what=f"{kind} get_velocity")
    if kind == "dpm++2m":
        dpm = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
        dpm.set_timesteps(10)
        ts = dpm.timesteps[[0, 4, 9]]
        want = dpm.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ts).numpy()
        got = sched.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(ts.numpy(), jnp.int32))
        assert_close(got, want, atol=1e-5, rtol=1e-5, what="dpm add_noise at schedule timesteps")
    with pytest.raises(TypeError, match="integer"):
        sched.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t, jnp.float32))
    with pytest.raises(ValueError, match="shape"):
        sched.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t[:2]))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_predicted_original_inverts_the_forward_process(prediction):
    """``predicted_original`` recovers x0 from a noisy sample and the model output a perfect model of each
    prediction type would give (ε, v or x0 itself), at timesteps from nearly clean to nearly pure noise; an output
    of another shape than the sample is refused."""
    rng = np.random.default_rng(2)
    x0 = jnp.asarray(rng.standard_normal((3, 4, 4, 4)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((3, 4, 4, 4)), jnp.float32)
    t = jnp.asarray([0, 500, 900], jnp.int32)  # t = 999: sqrt(alpha_bar) ≈ 0.07 amplifies float32 rounding
    sched = load_scheduler({**SD15_SCHEDULER_CONFIG, "prediction_type": prediction}, kind="ddim")
    noisy = sched.add_noise(x0, noise, t)
    output = {"epsilon": noise, "v_prediction": sched.get_velocity(x0, noise, t), "sample": x0}[prediction]
    assert_close(sched.predicted_original(output, noisy, t), np.asarray(x0), atol=2e-4, rtol=1e-4,
                 what=f"{prediction} x0")
    with pytest.raises(ValueError, match="shape"):
        sched.predicted_original(output[:2], noisy, t)


def test_pndm_config_needs_kind(torch, diffusers, arrays):
    """SD1.5's own PNDMScheduler config: no kind → clear error; with kind → what diffusers' from_config gives."""
    pndm = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", **SD15_BETAS, "clip_sample": False,
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
    with pytest.raises(SchedulerConfigError, match="kind=") as err:
        load_scheduler(pndm)
    for k in ("'ddim'", "'dpm++2m'", "'euler'", "PNDMScheduler"):
        assert k in str(err.value)
    for kind in ("ddim", "dpm++2m", "euler"):
        check_parity(torch, diffusers, kind, pndm, 10, arrays, eager=False)
    assert load_scheduler(pndm, kind="ddim").config == load_scheduler(SD15_SCHEDULER_CONFIG).config


def test_load_from_diffusers_folders(diffusers, tmp_path):
    """Configs written by diffusers' save_config (every field present) load as the right class, same values."""
    for kind, name in CLASS_NAMES.items():
        cfg = base_config(kind, prediction_type="v_prediction")
        tsched = getattr(diffusers, name).from_config(cfg)
        folder = tmp_path / kind / "scheduler"
        tsched.save_config(folder)
        for where in (folder, folder.parent, folder / "scheduler_config.json"):
            sched = load_scheduler(where)
            assert type(sched) is OURS[kind]
            for field, value in sched.config.to_dict().items():
                assert value == tsched.config[field], field
        with open(folder / "scheduler_config.json") as f:
            saved = json.load(f)
        assert load_scheduler(saved) == sched and hash(load_scheduler(saved)) == hash(sched)
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        load_scheduler(tmp_path / "nowhere")


def test_config_errors():
    """Bad configs and calls fail with messages naming the input."""
    with pytest.raises(SchedulerConfigError, match="beta_schedule='cubic'"):
        load_scheduler(base_config("ddim", beta_schedule="cubic"))
    with pytest.raises(SchedulerConfigError, match="unknown keys: not_a_field"):
        load_scheduler(base_config("euler", not_a_field=1))
    with pytest.raises(SchedulerConfigError, match="thresholding=True"):
        load_scheduler(base_config("ddim", thresholding=True))
    with pytest.raises(SchedulerConfigError, match="use_lu_lambdas=True"):
        load_scheduler(base_config("dpm++2m", use_lu_lambdas=True))
    with pytest.raises(SchedulerConfigError, match="solver_order=3"):
        load_scheduler(base_config("dpm++2m", solver_order=3))
    with pytest.raises(SchedulerConfigError, match="algorithm_type='sde-dpmsolver\\+\\+'"):
        load_scheduler(base_config("dpm++2m", algorithm_type="sde-dpmsolver++"))
    with pytest.raises(SchedulerConfigError, match="timestep_spacing"):
        load_scheduler(base_config("euler", timestep_spacing="karras"))
    with pytest.raises(SchedulerConfigError, match="num_train_timesteps"):
        load_scheduler(base_config("ddim", num_train_timesteps="1000"))
    with pytest.raises(ValueError, match="kind='pndm'"):
        load_scheduler(SD15_SCHEDULER_CONFIG, kind="pndm")
    # harmless keys of other diffusers schedulers are ignored (SD2's Euler config carries PNDM leftovers)
    euler = load_scheduler(base_config("euler", skip_prk_steps=True, clip_sample=False, set_alpha_to_one=False))
    assert euler == load_scheduler(base_config("euler"))
    ddim = load_scheduler(SD15_SCHEDULER_CONFIG)
    with pytest.raises(ValueError, match="num_inference_steps=1001"):
        ddim.set_timesteps(1001)
    with pytest.raises(TypeError, match="Python int"):
        ddim.set_timesteps(jnp.int32(10))
    with pytest.raises(ValueError, match="steps_offset"):  # leading + offset 1 would give t = 1000
        ddim.set_timesteps(1000)
    dpm = load_scheduler(SD15_SCHEDULER_CONFIG, kind="dpm++2m")
    state = dpm.set_timesteps(10)
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="sample_shape"):
        dpm.step(state, x, 0, x)
    with pytest.raises(ValueError, match="model_output shape"):
        ddim.step(ddim.set_timesteps(10), x[:1], 0, x)


def test_sd15_defaults():
    """The SD1.5 config: DDIM 50 steps is 981, 961, …, 1; DynamicID's sampler (eta 0, no clipping)."""
    sched = load_scheduler(SD15_SCHEDULER_CONFIG)
    c = sched.config
    assert (c.beta_schedule, c.beta_start, c.beta_end, c.num_train_timesteps) == ("scaled_linear", 0.00085,
                                                                                  0.012, 1000)
    assert (c.steps_offset, c.set_alpha_to_one, c.prediction_type, c.clip_sample) == (1, False, "epsilon", False)
    np.testing.assert_array_equal(sched.set_timesteps(50).timesteps, np.arange(981, 0, -20))
    # set_timesteps also works while tracing (host-side tables become constants)
    traced = jax.jit(functools.partial(sched.set_timesteps, 50))()
    np.testing.assert_array_equal(traced.timesteps, np.arange(981, 0, -20))
    with pytest.raises(TypeError):
        SD15_SCHEDULER_CONFIG["steps_offset"] = 0  # read-only
