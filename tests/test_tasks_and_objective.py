"""Tasks as data, the training rules, and the masked multi-modal loss."""

import pytest
import torch

from omniflow.modality import Modality
from omniflow.objective import (
    FlowObjective,
    TrainingRules,
    direction_mse,
    flow_loss,
    plan_batch,
    select_pooled,
)
from omniflow.presets import PRESETS
from omniflow.tasks import BUILTIN_TASKS, Role, Task, get_task

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
