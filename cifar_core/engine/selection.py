"""Data selection by a small proxy model (airbench96_faster, Jordan 2024): each step the run's model
trains only on the images of its batch that a narrower copy of the network, trained alongside on the
same batches, finds hardest (highest loss).

The proxy is the run's model at `select_proxy_width` (its other parameters the run's), initialised from
the same training images (fastnet's whitening) and from its own seed, so the main model's initial weights
are those of the run without selection. It predicts every augmented batch in train mode (its batch norm
follows the data) and takes a Nesterov SGD step on its own selection every `select_proxy_every` steps,
with the run's learning rate, schedule, weight decay and bias LR scale. The main model then computes
its forward and backward passes on the `select_keep` share of the batch only, which is where the time
goes. airbench96_faster computes the proxy's selections in a run of their own before the main run;
here the proxy trains within the same steps (its trajectory does not depend on the main model, so the
selections are the same), and its weights and optimizer are the objective's checkpointed state, so a
resumed run selects as the uninterrupted one would.
"""
from __future__ import annotations

import math

import torch

from ..data import NUM_CLASSES
from ..models import count_params, create_model
from ..schedules import build_schedule
from .objectives import OBJECTIVES, LabeledBatch, Objective, StepContext, StepResult, supervised_loss
from .prepare import Prepared, init_from_training_images
from .rng import PROXY_INIT, seeded_generator
from .tricks import decay_groups, effective_precision


def proxy_model(cfg, prep: Prepared) -> torch.nn.Module:
    """The run's network at the proxy's width, initialised from its own seed without touching the
    global generator, then from the run's training images where the model does that."""
    seed = int(torch.randint(2**62, (1,), generator=seeded_generator(cfg.seed, PROXY_INIT)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proxy = create_model(cfg.model, {**cfg.model_params, "width": cfg.select_proxy_width}, NUM_CLASSES)
    init_from_training_images(proxy, prep)
    proxy.to(prep.device)
    if cfg.channels_last:
        proxy = proxy.to(memory_format=torch.channels_last)
    return proxy.train()


def proxy_optimizer(cfg, proxy: torch.nn.Module) -> torch.optim.SGD:
    """Nesterov SGD at the run's LR (weight decay on kernels and matrices, biases and norms at the bias
    LR scale), whichever optimizer the main model uses: the proxy only has to rank images."""
    groups = decay_groups(cfg, [p for p in proxy.parameters() if p.requires_grad])
    momentum = cfg.momentum if cfg.optimizer in ("sgd", "muon") else 0.9
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=momentum, nesterov=momentum > 0)


def hardest(losses: torch.Tensor, keep: int) -> torch.Tensor:
    """Positions of the `keep` highest losses, in batch order."""
    return losses.topk(keep).indices.sort().values


@OBJECTIVES.register("proxy_select", description="the run's loss on the select_keep share of each batch with the "
                                                 "highest loss under a small proxy model trained alongside "
                                                 "(airbench96_faster's data selection)")
class ProxySelect(Objective):
    proxy: torch.nn.Module
    optimizer: torch.optim.SGD

    @classmethod
    def images_per_labeled(cls, cfg):
        # the kept share trains fully; the proxy (cost ~ width² of the network) predicts every image (a
        # forward pass: a third) and trains on its own kept share every select_proxy_every steps
        proxy = cfg.select_proxy_width ** 2 * (1 / 3 + cfg.select_keep * (2 / 3) / cfg.select_proxy_every)
        return cfg.select_keep + proxy

    def attach(self, prep):
        cfg = self.cfg
        self.proxy = proxy_model(cfg, prep)
        self.optimizer = proxy_optimizer(cfg, self.proxy)
        self.scaler = torch.amp.GradScaler("cuda", enabled=effective_precision(cfg, prep.device) == "fp16")
        self.schedule = None  # built at the first step, when the run's step count is known

    def loss(self, model, batch, ctx):
        keep, proxy_loss = self.select(batch, ctx)
        x = batch.x[keep]
        if batch.x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # indexing returns the default layout
        logits, targets = model(x), batch.y_soft[keep]
        return StepResult(supervised_loss(ctx.prep, logits, targets, ctx), logits, targets,
                          {"proxy_loss": proxy_loss})

    def select(self, batch: LabeledBatch, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions of the images the main model trains on this step, the proxy's mean loss on the
        batch); the proxy's step on its own selection on every select_proxy_every-th step."""
        cfg = self.cfg
        n_keep = max(1, round(cfg.select_keep * batch.y.shape[0]))
        trains = ctx.step % cfg.select_proxy_every == 0
        with torch.set_grad_enabled(trains):
            # the run's own loss, image by image: with a balancing loss (class weights, Balanced Softmax's
            # log prior, LDAM margins) plain cross-entropy would rank the rare classes' images hardest
            # because the proxy learns the prior, and selection would re-balance a second time
            losses = supervised_loss(ctx.prep, self.proxy(batch.x), batch.y_soft, ctx, reduction="none")
        keep = hardest(losses.detach(), n_keep)
        if trains:
            self.proxy_step(losses[keep].mean(), ctx)
        return keep, losses.detach().mean()

    def proxy_step(self, loss: torch.Tensor, ctx: StepContext) -> None:
        if self.schedule is None:
            cfg = self.cfg
            steps_per_epoch = max(1, math.ceil(len(ctx.prep.epoch_indices) / cfg.batch_size))
            self.schedule = build_schedule(cfg.schedule, cfg.schedule_params, max(1, ctx.total_steps), steps_per_epoch)
        lr = self.cfg.lr * self.schedule(ctx.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def results(self):
        cfg = self.cfg
        return {"data_selection": {"keep": cfg.select_keep, "proxy_width": cfg.select_proxy_width,
                                   "proxy_every": cfg.select_proxy_every,
                                   "proxy_parameters": count_params(self.proxy)}}

    def state_dict(self):
        return {"proxy": self.proxy.state_dict(), "proxy_optimizer": self.optimizer.state_dict(),
                "proxy_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state):
        if not state:
            return
        self.proxy.load_state_dict(state["proxy"])
        self.optimizer.load_state_dict(state["proxy_optimizer"])
        if state.get("proxy_scaler"):
            self.scaler.load_state_dict(state["proxy_scaler"])
