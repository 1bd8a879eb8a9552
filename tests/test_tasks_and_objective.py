"""Tasks as data, the training rules, and the masked multi-modal loss."""

import pytest
import torch
from tiny_clip import write_clip_text_towers

from omniflow.codecs import build_codec
from omniflow.codecs.text_vae_train import build_tiny_text_vae
from omniflow.modality import Modality
from omniflow.objective import (
    FlowObjective,
    TrainingRules,
    direction_mse,
    flow_loss,
    plan_batch,
    select_pooled,
)
from omniflow.presets import PRESETS, build_transformer
from omniflow.tasks import BUILTIN_TASKS, Role, Task, get_task
from omniflow.training import (
    Batch,
    OptimConfig,
    build_optimizer,
    build_scheduler,
    split_clip_prefix,
    train_step,
)

I, T, A = Modality.IMAGE, Modality.TEXT, Modality.AUDIO


def test_builtin_tasks_roles():
    assert set(BUILTIN_TASKS) == {"t2i", "i2t", "t2a", "a2t", "i2a", "a2i", "at2i", "it2a", "ai2t", "joint"}
    assert get_task("t2i").roles == {I: Role.TARGET, T: Role.CONDITION, A: Role.ABSENT}
    assert get_task("at2i").conditions == (T, A)
    assert get_task("joint").targets == (I, T, A) and get_task("joint").conditions == ()
    assert get_task("ai2t").pooled_source == I  # text first, then image, then audio
    assert get_task("a2i").pooled_source == A
    assert get_task("joint").pooled_source is None


def test_user_defined_task_and_errors():
    task = Task.define("t2ia", targets=["image", "audio"], conditions=["text"])
    assert task.targets == (I, A) and task.conditions == (T,) and task.absent == ()
    with pytest.raises(ValueError, match="both target and condition"):
        Task.define("bad", targets=["image"], conditions=["image"])
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        Task.define("bad", targets=["video"])
    with pytest.raises(ValueError, match="unknown task 'x2y'"):
        get_task("x2y")


def test_plan_without_rules_follows_roles():
    rules = TrainingRules(noised_condition_p=0, condition_drop_p=0, pooled_drop_p=0)
    tasks = [get_task("t2i"), get_task("a2t")]
    plan = plan_batch(tasks, FlowObjective(rules=rules), generator=torch.Generator().manual_seed(0))
    # t2i: image target in (0,1), text condition at 0, audio absent at 1
    assert 0 < plan.timesteps[I][0] < 1 and plan.timesteps[T][0] == 0 and plan.timesteps[A][0] == 1
    # a2t: image absent, text target, audio condition
    assert plan.timesteps[I][1] == 1 and 0 < plan.timesteps[T][1] < 1 and plan.timesteps[A][1] == 0
    assert plan.loss_mask[I].tolist() == [1, 0] and plan.loss_mask[T].tolist() == [0, 1]
    assert plan.loss_mask[A].tolist() == [0, 0]
    assert plan.pooled_keep.tolist() == [True, True] and plan.pooled_source == [T, A]


def test_plan_rule_probabilities():
    n = 20_000
    plan = plan_batch([get_task("t2i")] * n, FlowObjective(), generator=torch.Generator().manual_seed(0))
    t_text = plan.timesteps[T]
    dropped = (t_text == 1).float().mean().item()
    noised = ((t_text > 0) & (t_text < 1)).float().mean().item()
    assert abs(dropped - 0.15) < 0.015
    # noised with p=0.2 unless dropped afterwards
    assert abs(noised - 0.2 * 0.85) < 0.015
    # pooled kept unless zeroed (0.15) or its source (text) dropped (0.15), independently
    assert abs(plan.pooled_keep.float().mean().item() - 0.85 * 0.85) < 0.015
    assert torch.all(plan.loss_mask[T] == 0), "a condition is never in the loss"
    assert torch.all(~plan.pooled_keep[t_text == 1]), "a dropped condition's pooled vector is zeroed"


def test_pooled_vector_from_the_target_for_a_share_of_samples():
    """The release's rule: t2a and i2a samples take the target audio's pooled vector 30% of the
    time; other tasks, and the draws before it, are as without the rule."""
    n = 20_000
    tasks = [get_task("t2a"), get_task("i2a"), get_task("t2i")] * n
    rules = TrainingRules(pooled_from_target={"t2a": 0.3, "i2a": 0.3})
    plan = plan_batch(tasks, FlowObjective(rules=rules), generator=torch.Generator().manual_seed(0))
    plain = plan_batch(tasks, FlowObjective(), generator=torch.Generator().manual_seed(0))
    sources = plan.pooled_source
    for offset, own in ((0, T), (1, I)):
        mine = sources[offset::3]
        assert set(mine) == {A, own} and abs(mine.count(A) / n - 0.3) < 0.015
    assert set(sources[2::3]) == {T}
    for m in (I, T, A):
        assert torch.equal(plan.timesteps[m], plain.timesteps[m])
    switched = torch.tensor([mine != theirs for mine, theirs in zip(sources, plain.pooled_source)])
    assert torch.equal(plan.pooled_keep[~switched], plain.pooled_keep[~switched])
    with pytest.raises(ValueError, match="has 3 targets"):
        TrainingRules(pooled_from_target={"joint": 0.3})
    with pytest.raises(ValueError, match="unknown task|not a"):
        TrainingRules(pooled_from_target={"t2x": 0.3})


def test_fixed_time_plan_for_validation():
    plan = plan_batch([get_task("t2i"), get_task("it2a")] * 50, FlowObjective(), fixed_time=0.3,
                      generator=torch.Generator().manual_seed(0))
    assert torch.all(plan.timesteps[I][0::2] == 0.3) and torch.all(plan.timesteps[A][1::2] == 0.3)
    assert torch.all(plan.timesteps[T] == 0) and torch.all(plan.timesteps[I][1::2] == 0)  # conditions clean
    assert torch.all(plan.pooled_keep)


def test_select_pooled_pads_and_masks():
    pooled = {T: torch.ones(3, 4), I: 2 * torch.ones(3, 2)}
    out = select_pooled(pooled, [T, I, None], torch.tensor([True, True, True]), 6)
    assert out[0].tolist() == [1, 1, 1, 1, 0, 0]
    assert out[1].tolist() == [2, 2, 0, 0, 0, 0]
    assert out[2].tolist() == [0] * 6
    assert select_pooled(pooled, [T, I, None], torch.tensor([False, True, True]), 6)[0].abs().sum() == 0


def _batch(n, generator):
    shapes = PRESETS["tiny"].latent_shapes()
    return {m: torch.randn(n, *s, generator=generator) for m, s in shapes.items()}


def test_loss_components_match_definition(tiny_model):
    """The total is the mean over samples of the weighted sum of per-sample target MSEs."""
    g = torch.Generator().manual_seed(0)
    x0 = _batch(4, g)
    tasks = [get_task(n) for n in ("t2i", "i2t", "t2a", "joint")]
    objective = FlowObjective(loss_weights={I: 1.0, T: 0.5, A: 2.0})
    out = flow_loss(tiny_model, x0, tasks, objective=objective, generator=torch.Generator().manual_seed(1))
    assert set(out.per_modality) == {"image", "text", "audio"}
    assert set(out.per_task) == {"t2i", "i2t", "t2a", "joint"}
    expected = (
        out.per_task["t2i"] + out.per_task["i2t"] + out.per_task["t2a"] + out.per_task["joint"]
    ) / 4
    torch.testing.assert_close(out.loss.detach(), expected)
    # t2i has one target (image, weight 1): its task loss equals its image MSE
    g2 = torch.Generator().manual_seed(1)
    single = flow_loss(tiny_model, {m: x[:1] for m, x in x0.items()}, tasks[:1], objective=objective, generator=g2)
    torch.testing.assert_close(single.per_task["t2i"], single.per_modality["image"])
    assert out.loss.requires_grad


def test_pooled_from_any_draws_the_source_uniformly():
    """The release's any-to-any rule: a listed task's samples take the pooled vector of one of their
    modalities, each a third of the time; other tasks keep their own source; an unknown task is refused."""
    tasks = [get_task("joint")] * 600 + [get_task("i2t")] * 10
    rules = TrainingRules(pooled_from_any=["joint"], pooled_drop_p=0.0, condition_drop_p=0.0)
    plan = plan_batch(tasks, FlowObjective(rules=rules), generator=torch.Generator().manual_seed(0))
    drawn = plan.pooled_source[:600]
    shares = {m: drawn.count(m) / 600 for m in (I, T, A)}
    assert all(0.28 < share < 0.39 for share in shares.values()), shares
    assert plan.pooled_source[600:] == [I] * 10 and bool(plan.pooled_keep.all())
    plain = plan_batch(tasks, FlowObjective(rules=TrainingRules(pooled_drop_p=0.0)),
                       generator=torch.Generator().manual_seed(0))
    assert set(plain.pooled_source[:600]) == {get_task("joint").pooled_source}
    with pytest.raises(ValueError, match="unknown task 'any2any'"):
        TrainingRules(pooled_from_any=["any2any"])


def test_text_direction_term_adds_the_unit_vector_mse(tiny_model):
    """`text_direction_weight` w adds w * MSE(unit(x0 prediction), unit(x0)) per text target; unit
    vectors are per token, so scaling a token's prediction leaves the term unchanged."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the text head starts at zero, whose direction is undefined
        for p in tiny_model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    x0 = _batch(3, g)
    tasks = [get_task(n) for n in ("i2t", "a2t", "t2i")]
    preds = []
    handle = tiny_model.register_forward_hook(lambda module, args, out: preds.append(out[T].detach()) and None)
    plain, weighted = (flow_loss(tiny_model, x0, tasks, objective=FlowObjective(text_direction_weight=w),
                                 generator=torch.Generator().manual_seed(5)) for w in (0.0, 0.1))
    handle.remove()
    torch.testing.assert_close(preds[0], preds[1])
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)
    by_hand = (unit(preds[0]) - unit(x0[T])).pow(2).mean((1, 2))
    torch.testing.assert_close(weighted.per_modality["text"] - plain.per_modality["text"], 0.1 * by_hand[:2].mean())
    torch.testing.assert_close(weighted.per_task["t2i"], plain.per_task["t2i"])  # text is a condition there
    torch.testing.assert_close(direction_mse(3.0 * x0[T], x0[T]), torch.zeros(3), atol=1e-6, rtol=0)


def test_text_anchor_adds_the_decoders_cross_entropy_of_the_prediction(tiny_model):
    """`text_anchor_weight` w adds w * the frozen text decoder's cross-entropy of each text target's
    caption, read from the model's x0 prediction; its gradient reaches the transformer; t2i (text a
    condition) is unchanged; without the decoder or a caption it is an error."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    captions = ["class 0", "class 1", "class 2"]
    text_shape = PRESETS["tiny"].latent_shapes()[T]
    vae = build_tiny_text_vae(captions, num_queries=text_shape[0], latent_dim=text_shape[1], width=32, num_layers=1)
    vae.requires_grad_(False)
    x0 = _batch(3, g)
    tasks = [get_task(n) for n in ("i2t", "a2t", "t2i")]
    preds = []
    handle = tiny_model.register_forward_hook(lambda module, args, out: preds.append(out[T].detach()) and None)
    run = lambda w, **kw: flow_loss(tiny_model, x0, tasks, objective=FlowObjective(text_anchor_weight=w),
                                    generator=torch.Generator().manual_seed(5), **kw)
    plain = run(0.0)
    weighted = run(0.1, captions=captions, text_anchor=vae.caption_nll)
    handle.remove()
    by_hand = vae.caption_nll(preds[0][:2], captions[:2])
    torch.testing.assert_close(weighted.per_modality["text_ce"], by_hand.mean())
    torch.testing.assert_close(weighted.per_modality["text"] - plain.per_modality["text"], 0.1 * by_hand.mean())
    torch.testing.assert_close(weighted.per_task["t2i"], plain.per_task["t2i"])
    assert "text_ce" not in plain.per_modality

    grads = []
    for w in (0.0, 0.1):
        tiny_model.zero_grad()
        run(w, captions=captions, text_anchor=vae.caption_nll).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None]))
    assert not torch.allclose(grads[0], grads[1])
    assert all(p.grad is None for p in vae.parameters())

    with pytest.raises(ValueError, match="needs the text decoder"):
        run(0.1, captions=captions)
    with pytest.raises(ValueError, match="needs the caption of every sample with a text target"):
        run(0.1, captions=[None, "class 1", None], text_anchor=vae.caption_nll)
    run(0.1, captions=["class 0", "class 1", None], text_anchor=vae.caption_nll)  # t2i's caption is not read


def test_loss_is_deterministic_and_masks_conditions(tiny_model):
    x0 = _batch(2, torch.Generator().manual_seed(0))
    tasks = [get_task("t2i")] * 2
    a = flow_loss(tiny_model, x0, tasks, generator=torch.Generator().manual_seed(3))
    b = flow_loss(tiny_model, x0, tasks, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.loss, b.loss)
    assert set(a.per_modality) == {"image"}
    # the text condition's gradient path exists but the loss has no text term: a text head
    # change does not change a t2i loss
    with torch.no_grad():
        tiny_model.text_proj_out.weight.add_(1.0)
    c = flow_loss(tiny_model, x0, tasks, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.loss, c.loss)


def test_skip_absent_leaves_stream_out(tiny_model):
    x0 = _batch(2, torch.Generator().manual_seed(0))
    objective = FlowObjective(rules=TrainingRules(skip_absent=True))
    seen = []
    handle = tiny_model.register_forward_pre_hook(lambda mod, args: seen.append(set(args[0])))
    flow_loss(tiny_model, x0, [get_task("t2i")] * 2, objective=objective)
    handle.remove()
    assert seen == [{I, T}]


def test_skip_absent_runs_one_forward_per_group_of_modalities():
    """A mixed batch under skip_absent: each sample's forward holds only the modalities its task
    uses, and a stream no sample uses is not trained (fed as noise, it would be)."""
    from omniflow.presets import build_transformer
    from omniflow.training import Batch, OptimConfig, build_optimizer, build_scheduler, train_step

    tasks = [get_task(n) for n in ("t2i", "i2t", "a2t", "t2i")]
    batch = Batch(latents={m.value: x for m, x in _batch(4, torch.Generator().manual_seed(0)).items()}, tasks=tasks)
    groups = batch.by_streams()
    assert [[t.name for t in g.tasks] for g in groups] == [["t2i", "i2t", "t2i"], ["a2t"]]
    assert [set(g.latents) for g in groups] == [{"image", "text"}, {"text", "audio"}]
    assert torch.equal(groups[0].latents["image"], batch.latents["image"][[0, 1, 3]])

    def one_step(skip: bool, tasks) -> tuple[list, bool]:
        """(modalities of each forward, whether the audio stream's weights changed)"""
        model = build_transformer("tiny", seed=0)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "audio" in n}
        seen = []
        model.register_forward_pre_hook(lambda mod, args: seen.append(set(args[0])))
        optim = OptimConfig(lr=1e-2, warmup_steps=0)
        optimizer = build_optimizer(model, optim)
        train_step(model, [Batch(latents=batch.latents, tasks=tasks)], optimizer=optimizer,
                   scheduler=build_scheduler(optimizer, optim, total_steps=2),
                   objective=FlowObjective(rules=TrainingRules(skip_absent=skip)), generator=torch.Generator().manual_seed(0))
        moved = any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
        return seen, moved

    assert one_step(True, tasks) == ([{I, T}, {T, A}], True)
    image_text = [get_task("t2i"), get_task("i2t")] * 2
    assert one_step(True, image_text) == ([{I, T}], False)
    assert one_step(False, image_text) == ([{I, T, A}], True)


def test_loss_errors_name_the_problem(tiny_model):
    x0 = _batch(2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="3 tasks for a batch of 2"):
        flow_loss(tiny_model, x0, [get_task("t2i")] * 3)
    with pytest.raises(ValueError, match="no latents"):
        flow_loss(tiny_model, {T: x0[T]}, [get_task("t2i")] * 2)


def test_grouped_batches_recut_a_mix_into_full_batches_of_one_group():
    """Every sample pushed comes out once, in batches of exactly `batch_size` samples that all use
    the same modalities, and no more than one batch per group waits."""
    from omniflow.training import Batch, GroupedBatches

    names = ["t2i", "i2t", "a2t", "t2a", "at2i", "i2a"]
    groups, popped, pushed = GroupedBatches(4), [], 0
    for step in range(12):
        tasks = [get_task(names[(step + i) % len(names)]) for i in range(5)]
        ids = torch.arange(pushed, pushed + 5, dtype=torch.float32)
        pushed += 5
        groups.push(Batch(latents={m.value: ids.view(-1, 1) for m in Modality}, tasks=tasks,
                          pooled={"text": ids.view(-1, 1)}))
        while (batch := groups.pop()) is not None:
            popped.append(batch)
        assert all(sum(len(b) for b in parts) < 4 for parts in groups.pending.values())
    for batch in popped:
        assert len(batch) == 4
        assert len({tuple(sorted(set(t.roles) - set(t.absent), key=str)) for t in batch.tasks}) == 1
        used = {m.value for m in batch.tasks[0].roles if m not in batch.tasks[0].absent}
        assert set(batch.latents) == used
        assert torch.equal(batch.pooled["text"], next(iter(batch.latents.values())))
    seen = torch.cat([next(iter(b.latents.values())).flatten() for b in popped]).tolist()
    assert len(seen) == len(set(seen)) == pushed - groups.waiting()


def test_a_shift_set_for_one_modality_leaves_the_others_at_sd3s():
    objective = FlowObjective.model_validate({"timesteps": {"shift": {"audio": 1}}})
    assert objective.timesteps.shift == {Modality.IMAGE: 3.0, Modality.TEXT: 3.0, Modality.AUDIO: 1.0}
    with pytest.raises(ValueError, match="greater than 0"):
        FlowObjective.model_validate({"timesteps": {"shift": {"audio": 0}}})


@pytest.fixture(scope="module")
def clip_text(tmp_path_factory):
    """Two CLIP text towers 8 wide: their hidden states side by side (16) fit the tiny text width."""
    root = write_clip_text_towers(tmp_path_factory.mktemp("clip"), hidden_size=8)
    return build_codec({"kind": "clip-text-pooled", "path": str(root), "pooled_dim": 24, "max_length": 6})


def test_clip_prefix_puts_the_drawn_samples_in_a_batch_of_their_own(clip_text):
    """`rules.clip_prefix` {t2i: 1}: every t2i sample goes to a second batch whose text stream is
    its caption's CLIP hidden states (6 tokens here) then its latent, both zero-padded to the
    width; the other samples stay as they were; a share of 0.5 draws about half."""
    g = torch.Generator().manual_seed(0)
    x0 = _batch(6, g)
    names = ("t2i", "t2i", "t2a", "i2t", "t2i", "t2a")
    captions = ["red cube", "blue ball", "dog barks", "a cat", "green", "rain"]
    batch = Batch(latents={m.value: v for m, v in x0.items()}, tasks=[get_task(n) for n in names], captions=captions)
    states = lambda texts: clip_text.encode(texts)[1]
    rest, pre = split_clip_prefix(batch, {"t2i": 1.0}, states, width=24, generator=torch.Generator().manual_seed(1))
    assert [t.name for t in pre.tasks] == ["t2i"] * 3 and pre.captions == [captions[i] for i in (0, 1, 4)]
    assert [t.name for t in rest.tasks] == ["t2a", "i2t", "t2a"] and rest.text_prefix == 0
    torch.testing.assert_close(rest.latents["text"], x0[T][[2, 3, 5]], rtol=0, atol=0)
    hidden = states(pre.captions)
    assert hidden.shape == (3, 6, 16) and pre.text_prefix == 6 and pre.latents["text"].shape == (3, 10, 24)
    torch.testing.assert_close(pre.latents["text"][:, :6, :16], hidden, rtol=0, atol=0)
    torch.testing.assert_close(pre.latents["text"][:, 6:, :16], x0[T][[0, 1, 4]], rtol=0, atol=0)
    assert not pre.latents["text"][..., 16:].any()
    torch.testing.assert_close(pre.latents["image"], x0[I][[0, 1, 4]], rtol=0, atol=0)

    many = Batch(latents={m.value: v for m, v in _batch(400, g).items()}, tasks=[get_task("t2i")] * 400,
                 captions=["red"] * 400)
    parts = split_clip_prefix(many, {"t2i": 0.5}, states, width=16, generator=torch.Generator().manual_seed(2))
    assert len(parts) == 2 and 160 < len(parts[1]) < 240 and sum(map(len, parts)) == 400
    assert split_clip_prefix(batch, {"t2a": 0.0}, states, width=16) == [batch]
    with pytest.raises(ValueError, match="needs the CLIP text encoders"):
        split_clip_prefix(batch, {"t2i": 1.0}, None, width=16)
    with pytest.raises(ValueError, match="needs the caption of every sample it draws"):
        split_clip_prefix(Batch(latents=batch.latents, tasks=batch.tasks), {"t2i": 1.0}, states, width=16)
    with pytest.raises(ValueError, match="CLIP hidden states .16 wide. and text latents .16 wide. must fit"):
        split_clip_prefix(batch, {"t2i": 1.0}, states, width=12)
    with pytest.raises(ValueError, match="task 'i2t' has no text condition"):
        TrainingRules(clip_prefix={"i2t": 0.5})


def test_prefixed_text_is_clean_unless_dropped_and_its_latent_padding_stays_zero(clip_text):
    """With CLIP hidden states before the latent, the text condition is never noised (even at
    noised_condition_p 1): t = 0 gives the stream as it is, a dropped one (t = 1) is noise except
    the latent tokens' features past the latent width, which stay zero as at sampling."""
    model = build_transformer("tiny", joint_attention_dim=24).eval()
    x0 = _batch(32, torch.Generator().manual_seed(0))
    batch = Batch(latents={m.value: v for m, v in x0.items()}, tasks=[get_task("t2i")] * 32, captions=["red cube"] * 32)
    (pre,) = split_clip_prefix(batch, {"t2i": 1.0}, lambda texts: clip_text.encode(texts)[1], width=24)
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(args) and None)
    objective = FlowObjective(rules=TrainingRules(noised_condition_p=1.0, condition_drop_p=0.5))
    flow_loss(model, pre.latents, pre.tasks, objective=objective, generator=torch.Generator().manual_seed(3),
              text_prefix=pre.text_prefix)
    handle.remove()
    x_t, t = seen[0][0][T], seen[0][1][T]
    clean, dropped = t == 0, t == 1
    assert bool((clean | dropped).all()) and clean.any() and dropped.any()
    torch.testing.assert_close(x_t[clean], pre.latents["text"][clean], rtol=0, atol=0)
    assert (x_t[dropped][:, :, :16] != 0).all() and (x_t[dropped][:, :6, 16:] != 0).all()
    assert not x_t[dropped][:, 6:, 16:].any()
    with pytest.raises(ValueError, match="must be a condition of every sample"):
        flow_loss(model, pre.latents, [get_task("i2t")] * 32, text_prefix=pre.text_prefix)
    all_dropped = FlowObjective(rules=TrainingRules(condition_drop_p=1.0, skip_absent=True))
    out = flow_loss(model, pre.latents, pre.tasks, objective=all_dropped, text_prefix=pre.text_prefix)
    assert set(out.per_modality) == {"image"}  # the text stream, dropped everywhere, is left out


def test_train_step_runs_prefixed_samples_as_a_forward_of_their_own(clip_text):
    model = build_transformer("tiny")
    g = torch.Generator().manual_seed(0)
    batch = Batch(latents={m.value: v for m, v in _batch(8, g).items()},
                  tasks=[get_task(n) for n in ("t2i", "i2t") * 4], captions=["red cube", "a ball"] * 4)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(args[0][T].shape) and None)
    optim = OptimConfig(lr=1e-3, warmup_steps=0)
    optimizer = build_optimizer(model, optim)
    objective = FlowObjective(rules=TrainingRules(clip_prefix={"t2i": 1.0}))
    out = train_step(model, [batch], optimizer=optimizer, scheduler=build_scheduler(optimizer, optim, total_steps=2),
                     objective=objective, generator=g, clip_states=lambda texts: clip_text.encode(texts)[1])
    assert forwards == [(4, 4, 16), (4, 10, 16)] and out.samples == 8
    assert set(out.task_counts) == {"t2i", "i2t"} and all(v == 4 for v in out.task_counts.values())


def test_the_reference_profile_is_the_release_recipe_under_given_fields():
    reference = FlowObjective.model_validate({"profile": "reference"})
    assert reference.timesteps.shift == {I: 1.0, T: 1.0, A: 1.0}
    assert reference.rules.pooled_from_target == {"t2a": 0.3, "i2a": 0.3} and reference.rules.pooled_from_any == ["joint"]
    assert reference.rules.clip_prefix == {"t2i": 0.5, "t2a": 0.5} and reference.rules.prefixes_clip
    assert reference.text_direction_weight == reference.text_anchor_weight == 0.1
    assert (reference.rules.noised_condition_p, reference.rules.condition_drop_p) == (0.2, 0.15)  # the defaults
    given = FlowObjective.model_validate({"profile": "reference", "text_anchor_weight": 0.0,
                                          "rules": {"clip_prefix": {"t2i": 0, "t2a": 0}, "skip_absent": True}})
    assert given.text_anchor_weight == 0.0 and not given.rules.prefixes_clip and given.rules.skip_absent
    assert given.rules.pooled_from_any == ["joint"]  # what was not given stays the profile's
    assert FlowObjective() == FlowObjective(profile="project") and FlowObjective().text_anchor_weight == 0.0
