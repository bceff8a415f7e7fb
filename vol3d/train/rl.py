"""Reinforcement fine-tuning with verifiable rewards (GRPO), an :class:`~vol3d.train.objectives.Objective`.

``vol3d finetune --task grpo --init RUN`` (configs/finetune/grpo.yaml) runs the one training loop with
this objective instead of the supervised one. Per case of a batch, the model writes ``rl.group_size``
answers to the same prompt by sampling (with perception: after reading its *own* findings digest, as
at inference, not the ground truth's), each answer gets a reward computed from the reference
(nothing learned judges it), and the policy gradient pushes up the answers that beat their group's
mean (Group Relative Policy Optimisation, DeepSeekMath / Med-R1; one update per sample, so the PPO
ratio is 1 and its clip idle; no KL term, as DAPO).

Rewards (:func:`reward`), in 0..1:

- ``report``: F1 of the findings the answer asserts vs the reference's (the rule-based, negation-aware
  :func:`vol3d.eval.metrics.extract_findings` that the evaluation uses); 1 when neither names one;
- ``vqa_closed``: exact match after :func:`vol3d.eval.metrics.normalise_answer`;
- ``ground``: mean IoU of the answer's boxes with the true ones (Hungarian matching, as the metric).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


def reward(task: str, answer: str, sample: Any, vocab: Any) -> float:
    """The verifiable reward of one answer to a :class:`vol3d.tasks.samples.Sample` (see the module docstring)."""
    from vol3d.eval.metrics import answer_ious, extract_findings, normalise_answer

    if task == "report":
        said = {k for k, v in extract_findings(answer, vocab).items() if v}
        true = {k for k, v in extract_findings(sample.answer, vocab).items() if v}
        if not said and not true:
            return 1.0
        return 2.0 * len(said & true) / (len(said) + len(true))
    if task == "vqa_closed":
        return float(normalise_answer(answer) == normalise_answer(sample.answer))
    if task == "ground":
        truth = sample.extras.get("boxes_vox")
        if truth is None or not len(truth):
            return float("<box>" not in answer)  # right to give no box about an absent finding
        ious = answer_ious(answer, truth, sample.extras["shape"])
        return float(np.mean(ious)) if len(ious) else 0.0
    raise ValueError(f"no verifiable reward for task {task!r}")


def group_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """``rewards (B, G)`` -> advantages ``(B, G)``: each reward minus its group's mean, over the group's
    standard deviation; 0 for a group whose answers all scored the same (nothing to prefer)."""
    mean, std = rewards.mean(dim=1, keepdim=True), rewards.std(dim=1, unbiased=False, keepdim=True)
    return torch.where(std > eps, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


def sequence_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean log-probability of each sequence's labelled tokens ``(B,)`` (``logits (B, T, V)`` at ``t``
    predict ``labels (B, T)`` at ``t + 1``)."""
    shift = labels[:, 1:]
    mask = shift != ignore_index
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, shift.masked_fill(~mask, 0)[..., None])[..., 0]
    return (logp * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class GRPOObjective:
    """Group-relative policy optimisation of the text answers (see the module docstring).

    Args:
        processor: the model's processor (prompt + answer -> ids, labels on the answer only).
        mix: the tasks to sample prompts from (:class:`vol3d.tasks.TaskMix`; report, vqa_closed, ground).
        rl: a :class:`vol3d.train.config.RLConfig` (group size, sampling temperature, answer length).
        vocab: finding vocabulary of the prompts and the report reward.
        max_length: token budget per sequence.
    """

    def __init__(self, processor: Any, mix: Any, rl: Any, vocab: Any, max_length: int = 512) -> None:
        self.processor, self.mix, self.rl, self.vocab, self.max_length = processor, mix, rl, vocab, max_length

    def make_batch(self, items: list[dict[str, Any]], rngs: list[np.random.Generator]) -> dict[str, Any]:
        from vol3d.tasks.samples import sample_one

        weights = self.mix.weights()
        tasks = [t for t, w in weights.items() if w > 0]
        probs = np.array([weights[t] for t in tasks], float)
        samples = []
        for case, rng in zip(items, rngs, strict=True):
            task = str(rng.choice(tasks, p=probs / probs.sum()))
            samples.append(sample_one(case, task, rng, vocab=self.vocab, box_format="text"))
        return {"volume": torch.stack([torch.as_tensor(np.asarray(c["image"]), dtype=torch.float32) for c in items]),
                "spacing": torch.stack([torch.as_tensor(np.asarray(c.get("spacing", (1.0, 1.0, 1.0))), dtype=torch.float64)
                                        for c in items]),
                "samples": samples}

    @torch.no_grad()
    def sample(self, model: nn.Module, batch: dict[str, Any]) -> list[list[str]]:
        """``group_size`` sampled answers per case."""
        model = getattr(model, "module", model)  # DDP: generate is the wrapped model's
        g = self.rl.group_size
        out = []
        for b, s in enumerate(batch["samples"]):
            vol = batch["volume"][b : b + 1].expand(g, *batch["volume"].shape[1:])
            kw = {"spacing": batch["spacing"][b].cpu().numpy()} if getattr(model, "perception", None) is not None else {}
            # raw: the policy's own tokens (not valued or reconciled by the perception), whose log-probability
            # the update raises or lowers
            out.append([str(t) for t in model.generate(vol, [s.prompt] * g, max_new_tokens=self.rl.max_new_tokens,
                                                       do_sample=True, temperature=self.rl.temperature, top_k=0,
                                                       raw=True, **kw)])
        return out

    def policy_loss(self, model: nn.Module, batch: dict[str, Any], answers: list[list[str]],
                    advantages: Tensor) -> Tensor:
        """``-mean(advantage x mean log-prob of the answer)`` over the answers with a non-zero advantage,
        each read after the digest the model itself perceives (as it was sampled)."""
        samples, g = batch["samples"], len(answers[0])
        prompts = [s.prompt for s in samples for _ in range(g)]
        flat = [a for group in answers for a in group]
        vi = torch.arange(len(samples), device=batch["volume"].device).repeat_interleave(g)
        regions, contexts = None, None
        inner = getattr(model, "module", model)
        if getattr(inner, "perception", None) is not None:
            from vol3d.tasks.regions import digest_text

            was = inner.training
            inner.eval()  # the regions it perceives at inference, batch statistics untouched
            with torch.no_grad():
                found, regions = inner._perceived(inner.encode_volume(batch["volume"]), batch["spacing"].cpu().numpy(),
                                                  batch["volume"])
            inner.train(was)
            contexts = [digest_text(found[int(i)], inner.vocab) for i in vi]
        enc = self.processor(prompts, flat, max_length=self.max_length, contexts=contexts)
        dev = batch["volume"].device
        out = model(batch["volume"], enc["input_ids"].to(dev), enc["attention_mask"].to(dev),
                    volume_index=vi, regions=regions)
        logp = sequence_logprobs(out["logits"], enc["labels"].to(dev))
        adv = advantages.reshape(-1).to(logp.device)
        active = adv != 0
        if not bool(active.any()):
            return logp.sum() * 0.0  # every group tied: no gradient, but a graph for the loop
        return -(adv[active] * logp[active]).mean()

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        answers = self.sample(model, batch)
        rewards = torch.tensor([[reward(s.task, a, s, self.vocab) for a in group]
                                for s, group in zip(batch["samples"], answers, strict=True)], dtype=torch.float32)
        adv = group_advantages(rewards)
        loss = self.policy_loss(model, batch, answers, adv)
        logs = {"reward": float(rewards.mean()), "reward_spread": float(rewards.std(dim=1, unbiased=False).mean()),
                "active_groups": float((adv.abs().sum(dim=1) > 0).float().mean())}
        return loss, logs

    def validate(self, model: nn.Module, items: Any) -> dict[str, float]:
        """Mean reward of the policy's own greedy answers on ``items`` (the same prompt per item every time)."""
        rngs = [np.random.default_rng([0, i]) for i in range(len(items))]
        rewards = []
        for i in range(len(items)):
            batch = self.make_batch([items[i]], [rngs[i]])
            s = batch["samples"][0]
            kw = {"spacing": batch["spacing"][0].numpy()} if getattr(model, "perception", None) is not None else {}
            dev = next(model.parameters()).device
            answer = model.generate(batch["volume"].to(dev), [s.prompt], max_new_tokens=self.rl.max_new_tokens,
                                    raw=True, **kw)[0]
            rewards.append(reward(s.task, str(answer), s, self.vocab))
        return {"reward": float(np.mean(rewards)) if rewards else float("nan")}


__all__ = ["GRPOObjective", "group_advantages", "reward", "sequence_logprobs"]
