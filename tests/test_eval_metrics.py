"""The evaluation's metric functions on inputs with known answers (docs/method.md §9, docs/evaluation.md): greedy
matching and placement, the identity baselines over every pair and the FaceSim rule, bootstrap intervals, the
targets' bars and paired differences, the protocol's sizes and lanes, and dlib's Euclidean identity metric. The
same functions on real SynthFace images and end to end: test_eval.py."""
import numpy as np
import pytest

from dynamicid_jax.eval import bootstrap as BS
from dynamicid_jax.eval import metrics as M
from dynamicid_jax.eval import scores as SC
from synthface.evaluation import suite as S
from synthface.evaluation import targets as ST

# ------------------------------------------------------------------------------------------ metric functions
def test_matching_placement_and_accuracy_on_constructed_inputs():
    sim = np.array([[0.9, 0.8], [0.85, 0.1], [0.2, 0.3]])  # 3 faces × 2 references
    # greedy: (face 0, ref 0) = 0.9 first, then the best left for ref 1 is face 2 (0.3), not face 1
    np.testing.assert_array_equal(M.greedy_match(sim), [0, 2])
    np.testing.assert_array_equal(M.greedy_match(sim[:1]), [0, -1])  # one face: the second reference is missed
    np.testing.assert_array_equal(M.greedy_match(np.zeros((0, 2))), [-1, -1])
    refs = np.eye(3)[:2] * 5.0  # unnormalised on purpose
    faces = M.FaceDetections(np.array([[40, 10, 56, 30], [4, 10, 20, 30]], np.float32),  # right face, left face
                             np.array([[0.0, 1.0, 0.0], [0.6, 0.0, 0.8]], np.float32), np.ones(2, np.float32))
    match = M.match_faces(faces, refs)
    np.testing.assert_array_equal(match.face, [1, 0])
    np.testing.assert_allclose(match.similarity, [0.6, 1.0])
    row = np.array([[0, 0, 1, 0.5], [0, 0.5, 1, 1]])  # left, right halves of a 64-wide image
    np.testing.assert_array_equal(M.placed(match, faces, row, (40, 64)), [True, True])
    np.testing.assert_array_equal(M.placed(match, faces, row[::-1], (40, 64)), [False, False])  # swapped boxes
    missed = M.match_faces(M.FaceDetections.empty(3), refs)
    assert not missed.matched.any() and np.all(missed.similarity == 0)
    assert not M.placed(missed, M.FaceDetections.empty(3), row, (40, 64)).any()
    with pytest.raises(ValueError, match="2 layout boxes for 1 references"):
        M.placed(M.match_faces(faces, refs[:1]), faces, row, (40, 64))
    assert M.accuracy(["happy", None, "sad"], ["happy", "sad", "sad"]) == pytest.approx(2 / 3)
    assert M.accuracy([], []) is None
    assert M.view_of_pose((0, 9.0, 0)) == "front" and M.view_of_pose((0, -30.0, 0)) == "side"


def test_identity_baselines_and_clip_t_on_known_vectors():
    refs = np.array([[1.0, 0.0], [0.0, 1.0]])
    photos = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]])
    b = M.identity_baselines(refs, ["a", "b"], photos, ["a", "a", "b"])
    assert b["same_identity"] == pytest.approx((1.0 + 0.6 + 1.0) / 3)
    assert b["different_identity"] == pytest.approx((0.0 + 0.8 + 0.0) / 3)  # the one pair {a, b}: its 3 cells
    assert (b["same_pairs"], b["different_pairs"]) == (3, 1)
    with pytest.raises(ValueError, match="other people"):
        M.identity_baselines(refs, ["a", "b"], photos[:1], ["c"])
    t = np.random.default_rng(0).standard_normal((5, 7))
    np.testing.assert_allclose(M.clip_t(t, 3.0 * t), 1.0, atol=1e-12)
    np.testing.assert_allclose(M.clip_t(t, -t), -1.0, atol=1e-12)
    v = M.clip_t(t, np.random.default_rng(1).standard_normal((5, 7)))
    assert np.all(np.abs(v) <= 1.0)
    with pytest.raises(ValueError, match="one shape"):
        M.clip_t(t, t[:3])


def test_baseline_uses_every_identity_pair_and_the_facesim_rule():
    """n identities → n(n−1)/2 pairs, each the mean of both directions; the baseline is the mean over pairs; an
    image without a face scores 0 against every reference (the generated images' rule), and the best of several
    detected faces is the one matched."""
    n, per = 5, 3
    rng = np.random.default_rng(0)
    sim = rng.uniform(-0.2, 0.9, (n * per, n))
    ids = [f"p{k}" for k in range(n) for _ in range(per)]
    pb = SC.pair_baseline(sim, ids, [f"p{k}" for k in range(n)])
    assert len(pb["pairs"]) == n * (n - 1) // 2
    own = np.repeat(np.arange(n), per)
    np.testing.assert_allclose(pb["same"], sim[np.arange(n * per), own])
    a, c = 1, 3
    expected = np.concatenate([sim[own == a, c], sim[own == c, a]]).mean()
    assert pb["pairs"][("p1", "p3")] == pytest.approx(expected)
    assert pb["different_identity"] == pytest.approx(np.mean(list(pb["pairs"].values())))
    # balanced identities: the per-image means (the bootstrap's units) average to the same baseline
    assert pb["per_image_different"].mean() == pytest.approx(pb["different_identity"])
    with pytest.raises(ValueError, match="no reference"):
        SC.pair_baseline(sim, ids[:-1] + ["stranger"], [f"p{k}" for k in range(n)])
    refs = np.eye(3)[:2]
    dets = [M.FaceDetections.empty(3),
            M.FaceDetections(np.zeros((2, 4), np.float32), np.array([[0.6, 0.8, 0], [0.0, 0.6, 0.8]], np.float32),
                             np.array([0.9, 0.1], np.float32))]
    np.testing.assert_allclose(SC.facesim_matrix(dets, refs), [[0.0, 0.0], [0.6, 0.8]])


def test_bootstrap_intervals_are_deterministic_and_contain_the_estimate():
    rng = np.random.default_rng(1)
    values = rng.uniform(0, 1, 60)
    groups = np.repeat(np.arange(6), 10)
    a = BS.interval(values, groups, seed=7)
    assert a == BS.interval(values, groups, seed=7)  # fixed seed: identical intervals (metrics.json identical)
    assert a.contains(a.estimate) and a.low < a.estimate < a.high and a.n == 60
    assert a.estimate == pytest.approx(values.mean())
    # the half-width follows 1.96·sd/√n (what the protocol sizing uses), sd the within-identity spread
    assert a.half_width == pytest.approx(BS.Z95 * a.sd / np.sqrt(60), rel=0.25)
    shifted = values + groups * 0.3  # identities differ: the within-identity spread (and the interval) do not change
    assert BS.spread(shifted, groups) == pytest.approx(a.sd) and BS.spread(shifted) > 2 * a.sd
    assert BS.required_units(0.5, 0.1) == 97 and BS.required_units(0.2, 0.05) == 62
    cluster = BS.interval(values + groups * 0.3, groups, unit="identity", seed=7)
    strat = BS.interval(values + groups * 0.3, groups, seed=7)
    assert cluster.contains(cluster.estimate) and cluster.half_width > strat.half_width  # between-identity spread
    # paired differences: a constant shift has a zero-width difference interval
    ra = BS.replicates(values, groups, seed=3)
    rb = BS.replicates(values - 0.1, groups, seed=3)
    d = BS.difference(values.mean(), ra, values.mean() - 0.1, rb, 60)
    assert d.low == pytest.approx(0.1) and d.high == pytest.approx(0.1)
    with pytest.raises(ValueError, match="finite"):
        BS.interval([0.1, np.nan])


def _ci(estimate, half=0.02, n=100, sd=0.2):
    return {"estimate": estimate, "low": estimate - half, "high": estimate + half, "half_width": half, "n": n,
            "sd": sd, "unit": "image"}


def _method(facesim, placement, expr, drop, attr, left=0.5, right=0.5):
    return {"single": {"facesim": facesim, "ci": {"facesim": _ci(facesim)}},
            "multi": {"placement": placement, "ci": {"placement": _ci(placement, 0.05), "facesim_left": _ci(left),
                                                     "facesim_right": _ci(right)}},
            "edit": {"expression_accuracy": expr, "facesim_drop": drop,
                     "ci": {"expression_accuracy": _ci(expr, 0.05), "facesim_drop": _ci(drop)}},
            "attribute_accuracy": attr, "attribute_accuracy_ci": _ci(attr)}


def test_targets_relative_expr_bar_and_paired_differences():
    """Expr bar = 0.8 × the classifier's accuracy on real round-tripped images; single-ID bar = baseline + ½ gap
    and clearly above base (paired difference interval above 0); ablations by paired differences."""
    base_line = {"different_identity": 0.1, "same_identity": 0.7, "expression_accuracy_round_trip": 0.5,
                 "ci": {"different_identity": _ci(0.1), "same_identity": _ci(0.7),
                        "expression_accuracy_round_trip": _ci(0.5)}}
    results = {"dynamicid": _method(0.45, 0.95, 0.41, 0.05, 0.8), "no-imr": _method(0.45, 0.95, 0.2, 0.0, 0.8),
               "no-saa": _method(0.3, 0.5, 0.4, 0.05, 0.6), "base": _method(0.05, 0.4, 0.15, 0.0, 0.7)}
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.01, 500)
    keys = ("single.facesim", "multi.placement", "edit.expression_accuracy", "attribute_accuracy")

    def reps(m):
        r = results[m]
        vals = (r["single"]["facesim"], r["multi"]["placement"], r["edit"]["expression_accuracy"],
                r["attribute_accuracy"])
        return {k: v + noise for k, v in zip(keys, vals)}

    targets = {t["target"]: t for t in ST.synthface_targets(results, base_line, {m: reps(m) for m in results})}
    single = targets["single-ID identity"]
    assert single["measured"]["bar"] == pytest.approx(0.4) and single["passed"] is True
    assert single["measured"]["dynamicid_minus_base"]["low"] == pytest.approx(0.4, abs=1e-9)  # paired: no noise
    imr = targets["IMR edits"]
    assert imr["measured"]["bar"] == pytest.approx(0.4) and imr["passed"] is True  # 0.41 >= 0.8 × 0.5
    results["dynamicid"]["edit"]["ci"]["expression_accuracy"] = _ci(0.39, 0.05)
    assert {t["target"]: t for t in ST.synthface_targets(results, base_line, {m: reps(m) for m in results})}[
        "IMR edits"]["passed"] is False  # 0.39 < 0.4
    assert targets["two identities in one image"]["passed"] is True
    assert targets["ablation w/o IMR"]["passed"] is True and targets["ablation w/o SAA"]["passed"] is True
    no_base = {m: r for m, r in results.items() if m != "base"}
    t = {x["target"]: x for x in ST.synthface_targets(no_base, base_line, {m: reps(m) for m in no_base})}
    assert t["single-ID identity"]["passed"] is None  # without the base's images "clearly above" is unmeasured
    sizing = ST.protocol_sizing(results)
    assert sizing["metrics"]["single.facesim"]["units_needed"] == BS.required_units(0.2, 0.05)
    assert sizing["metrics"]["multi.placement"]["enough"] is True


def test_methods_split_into_balanced_lanes_with_no_imr_after_dynamicid():
    cost = {"dynamicid": 10.0, "no-imr": 1.0, "no-saa": 6.0, "base": 5.0, "infinite-id": 8.0}
    lanes = S._lanes(list(cost), cost, workers=2)
    assert sorted(m for lane in lanes for m in lane) == sorted(cost)  # every method once
    home = next(lane for lane in lanes if "dynamicid" in lane)
    assert home.index("no-imr") == home.index("dynamicid") + 1  # w/o IMR reuses DynamicID's images
    loads = sorted(sum(cost[m] for m in lane) for lane in lanes)
    assert loads == [14.0, 16.0]  # {dynamicid, no-imr, base} = 16 vs {infinite-id, no-saa} = 14
    assert S._lanes(list(cost), cost, workers=1) == [["dynamicid", "no-imr", "infinite-id", "no-saa", "base"]]
    assert S._lanes(["base"], {"base": 1.0}, workers=4) == [["base"]]


def test_protocol_adapts_to_the_number_of_held_out_identities():
    p = S.Protocol(single_images=20, multi_images=10, edit_images=4, edit_expressions=("neutral", "happy"),
                   batch=2, edit_batch=2)
    for n in (2, 5, 12):
        reqs = S.synthface_requests(p, n, 64, (64, 128))
        single = [r for r in reqs if r.kind == "single"]
        assert sorted({r.refs[0] for r in single}) == list(range(n))
        per_id = p.per_identity(20, n, 2)
        assert sum(len(r.prompts) for r in single) == n * per_id >= 20
        multi = [r for r in reqs if r.kind == "multi"]
        pairs = sorted({r.refs for r in multi})
        assert len(pairs) == n and sorted(a for a, _ in pairs) == list(range(n))  # everyone once on the left
        assert sorted(b for _, b in pairs) == list(range(n))  # and once on the right
        assert all((r.height, r.width) == (64, 128) for r in multi)
        assert all(r.boost_steps == 0 for r in multi)  # gate + routing, no layout boost (Protocol default)
        assert all(r.boost_steps is None for r in reqs if r.kind != "multi")  # the pipeline's own default
        edits = [r for r in reqs if r.kind == "edit"]
        m = min(n, 2)  # ⌈edit_images / edit_batch⌉ identities are enough for 4 images per expression
        assert sorted({r.group for r in edits}) == list(range(m))
        assert sum(len(r.prompts) for r in edits) == m * 2 * p.per_identity(4, m, 2) >= 2 * 4
        controls = {(r.group, r.seed) for r in reqs if r.kind == "control"}
        assert {(r.group, r.seed) for r in edits} == controls  # every edit has its unedited control


def test_identity_metrics_dlib_is_euclidean_on_raw_descriptors():
    from dynamicid_jax.faces import COSINE, DLIB_EUCLIDEAN, Face, identity_metric, identity_vector, same_person

    def face(vec, norm=None):
        v = np.asarray(vec, np.float32)
        return Face(np.zeros(4), np.zeros((5, 2)), np.zeros((5, 2)), v / np.linalg.norm(v), np.zeros(3), 1.0,
                    extras={} if norm is None else {"descriptor_norm": norm})

    class Dlibish:
        identity_metric = DLIB_EUCLIDEAN

    # two raw descriptors at cosine 0.95 but Euclidean distance ≈ 0.47 × 1.5 → dlib: same person only by distance
    a, b = face([1.0, 0.0], 1.5), face([0.95, np.sqrt(1 - 0.95 ** 2)], 1.5)
    dist = float(np.linalg.norm(identity_vector(a, DLIB_EUCLIDEAN) - identity_vector(b, DLIB_EUCLIDEAN)))
    assert dist == pytest.approx(1.5 * np.sqrt(2 - 2 * 0.95))
    assert same_person(Dlibish(), a, b) is (dist < 0.6)
    far = face([0.8, 0.6], 1.5)  # cosine 0.8, distance ≈ 0.95: not the same person although the cosine is high
    assert same_person(Dlibish(), a, far) is False
    assert identity_metric(object()) is COSINE
    with pytest.raises(ValueError, match="no same-person threshold"):
        same_person(object(), a, b)
    with pytest.raises(ValueError, match="descriptor_norm"):
        identity_vector(face([1.0, 0.0]), DLIB_EUCLIDEAN)
    # matching with a distance metric picks the nearest face; a missed reference is NaN / not the same person
    dets = M.FaceDetections(np.zeros((2, 4), np.float32), np.array([[3.0, 0.0], [0.0, 0.2]], np.float32),
                            np.ones(2, np.float32))
    m = M.match_faces(dets, np.array([[0.0, 0.0], [0.0, 0.5], [3.0, 0.1]]), DLIB_EUCLIDEAN)
    np.testing.assert_array_equal(m.face, [1, -1, 0])  # (face 0, ref 2) = 0.1 first, then (face 1, ref 0) = 0.2
    assert m.same.tolist() == [True, False, True] and np.isnan(m.similarity[1])
    np.testing.assert_allclose(m.similarity[[0, 2]], [0.2, 0.1], atol=1e-6)


def test_two_person_requests_carry_the_protocols_layout_boost_to_dynamicid():
    """Protocol.multi_boost_steps reaches the DynamicID pipeline as ``boost_steps`` on the two-person requests (0 by
    default; None: the pipeline's own default); a bad value is refused."""
    from dynamicid_jax.eval.runner import generate

    calls = []

    def fake_dynamicid(prompts, refs, **kw):
        calls.append(kw)
        return np.zeros((len(prompts), kw["height"], kw["width"], 3), np.uint8)

    refs = [np.zeros((64, 64, 3), np.uint8)] * 2
    for boost, want in ((S.Protocol().multi_boost_steps, 0), (None, None), (5, 5)):
        p = S.Protocol(single_images=2, multi_images=2, edit_images=0, multi_boost_steps=boost)
        multi = next(r for r in S.synthface_requests(p, 2, 64) if r.kind == "multi")
        calls.clear()
        for method in ("dynamicid", "no-saa"):
            generate(method, {"dynamicid": fake_dynamicid}, multi, refs, steps=2, guidance_scale=1.0)
        assert [c.get("boost_steps") for c in calls] == [want, want]
        assert [c["activate_query"] for c in calls] == [True, False]
    for bad in (-1, 1.5, "3"):
        with pytest.raises(ValueError, match="multi_boost_steps"):
            S.Protocol(multi_boost_steps=bad)


def test_the_protocols_id_scale_reaches_every_dynamicid_method_and_only_them():
    """Protocol.id_scale (0.7 by default) reaches the DynamicID pipeline of dynamicid / no-saa / no-imr through
    ``run_method``; the base is called without it; a scale that is not a number > 0 is refused."""
    from dynamicid_jax.eval import runner

    calls = []

    def fake(prompts, refs=None, **kw):
        calls.append(kw)
        return np.zeros((len(prompts), kw["height"], kw["width"], 3), np.uint8)

    class FakeSD:
        generate = staticmethod(fake)

    refs = [np.zeros((64, 64, 3), np.uint8)] * 2
    p = S.Protocol(single_images=2, multi_images=0, edit_images=0)
    single = [r for r in S.synthface_requests(p, 2, 64) if r.kind == "single"][:1]
    assert p.id_scale == 0.7 and p.to_dict()["id_scale"] == 0.7
    for method in ("dynamicid", "no-saa", "no-imr", "base"):
        calls.clear()
        runner.run_method(method, {"dynamicid": fake, "sd": FakeSD()}, single, refs, steps=2, guidance_scale=1.0,
                          id_scale=p.id_scale)
        assert [c.get("id_scale") for c in calls] == ([None] if method == "base" else [0.7]), method
    for bad in (0, -0.5, float("nan"), True, "0.7"):
        with pytest.raises(ValueError, match="id_scale"):
            S.Protocol(id_scale=bad)
