"""The Engine: everything around a Module that makes it train.

Fleet init and parallel wrapping, the optimizer and LR schedule, gradient accumulation and clipping, mixed
precision, recompute, evaluation, logging (progress bar and metrics.jsonl) and crash-safe checkpoints with
exact resume. A Module only turns batches into losses.
"""
import contextlib
import json
import math
import os
import random
import sys
import time
import warnings

import numpy as np
import paddle
import paddle.distributed as dist

from ppzoo.config import config_to_dict, resolve_parallel_and_batch
from ppzoo.core import checkpoint as ckpt
from ppzoo.core.optim import build_optimizer, clip_grad_norm
from ppzoo.core.recompute import apply_recompute
from ppzoo.data.datasets import build_dataset
from ppzoo.data.sampler import DistributedBatchSampler, collate
from ppzoo.data.tokenizer import Tokenizer
from ppzoo.distributed.cross_cluster import build_cross_cluster
from ppzoo.distributed.env import check_degrees, init_parallel_env
from ppzoo.distributed.expert_parallel import sync_expert_gradients
from ppzoo.distributed.fused_comm import allreduce_gradients, fused_mean
from ppzoo.distributed.hierarchical_storage import build_expert_storage
from ppzoo.errors import CheckpointError, ConfigError
from ppzoo.registry import DATASETS, MODULES

METRICS_FILE = "metrics.jsonl"


def resolve_device(requested):
    has_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if requested == "auto":
        return "gpu" if has_gpu else "cpu"
    if requested == "gpu" and not has_gpu:
        raise ConfigError(
            "Global.device is gpu but this Paddle build has no usable GPU. Install paddlepaddle-gpu (see the "
            "README) or set Global.device=cpu."
        )
    return requested


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def to_tensors(batch):
    return {key: paddle.to_tensor(value) for key, value in batch.items()}


class Engine:
    def __init__(self, cfg, module=None, train_dataset=None, eval_dataset=None, tokenizer=None):
        self.cfg = cfg
        self.device = resolve_device(cfg.Global.device)
        paddle.set_device(self.device)
        # The degrees are checked (what cannot run on this device says why) and the batch split resolved
        # before fleet is initialized: a pipeline schedule needs the split.
        check_degrees(cfg.Distributed, dist.get_world_size(), self.device)
        resolve_parallel_and_batch(cfg, dist.get_world_size())
        self.env = init_parallel_env(cfg.Distributed, self.device, pipeline_configs={
            "micro_batch_size": cfg.Global.micro_batch_size, "accumulate_steps": cfg.Engine.accumulate_steps})
        self.is_main = self.env.rank == 0
        self.output_dir = cfg.Engine.output_dir
        seed_everything(cfg.Global.seed)

        self.tokenizer = tokenizer
        if self.tokenizer is None and cfg.Data.tokenizer:
            self.tokenizer = Tokenizer.from_file(cfg.Data.tokenizer)
        self._check_vocab()

        self.module = module if module is not None else MODULES.get(cfg.model_module)(cfg.Model, self.env)
        # SE-MoE (Distributed.se_moe): the experts' weights and optimizer states move to tiered storage before
        # the optimizer is built, so the Paddle optimizer holds the dense parameters only. None when disabled.
        self.expert_storage = build_expert_storage(cfg, self.module, self.env.rank)
        self.train_dataset = train_dataset
        if self.train_dataset is None and cfg.Data.Train is not None:
            self.train_dataset = build_dataset(cfg.Data.Train, self._tokenizer_for(cfg.Data.Train), cfg.Data.seq_len)
        self.eval_dataset = eval_dataset
        if self.eval_dataset is None and cfg.Data.Eval is not None:
            self.eval_dataset = build_dataset(cfg.Data.Eval, self._tokenizer_for(cfg.Data.Eval), cfg.Data.seq_len)

        # GPU hybrid parallelism (mp / pp / sharding over NCCL) goes through fleet's hybrid wrappers, whose
        # optimizer clips by the norm across all groups; everywhere else ppzoo clips (clip_grad_norm).
        self.fleet_hybrid = self.device == "gpu" and self.env.world_size > 1 and (
            self.env.mp_size > 1 or self.env.pp_size > 1 or self.env.sharding_size > 1
        )
        if self.env.pp_size > 1:
            from ppzoo.distributed.gpu_parallel import build_pipeline_layer

            self.network = build_pipeline_layer(self.module, self.env, cfg.Engine.recompute)
        else:
            self.network = self.module
            if cfg.Engine.recompute:
                apply_recompute(self.module.recompute_units())
        self.amp = self._amp_settings()
        if cfg.Optimizer.tensor_fusion and self.amp["enable"] and (self.amp["level"] == "O2" or self.amp["dtype"] == "float16"):
            raise ConfigError(
                f"Optimizer.tensor_fusion works with float32 parameters and bf16 O1 autocast, not with "
                f"Engine.mix_precision level {self.amp['level']} / {self.amp['dtype']} (in {cfg.source}): set "
                "mix_precision.level=O1 and dtype=bfloat16, or Optimizer.tensor_fusion=false."
            )
        self.optimizer, self.lr_schedule = build_optimizer(
            cfg.Optimizer, self.network.parameters(), cfg.Engine.max_steps, paddle_clip=self.fleet_hybrid
        )
        if self.amp["enable"] and self.amp["level"] == "O2":
            self.network, self.optimizer = paddle.amp.decorate(
                self.network, self.optimizer, level="O2", dtype=self.amp["dtype"]
            )
        self.scaler = (
            paddle.amp.GradScaler(init_loss_scaling=cfg.Engine.mix_precision.init_loss_scaling)
            if self.amp["enable"] and self.amp["dtype"] == "float16"
            else None
        )
        if self.fleet_hybrid:
            from ppzoo.distributed.gpu_parallel import wrap_for_hybrid_parallel

            self.model, self.optimizer, self.scaler = wrap_for_hybrid_parallel(
                self.network, self.optimizer, self.scaler, self.env, cfg.Distributed.sharding_stage
            )
        else:
            self.model = self._wrap_data_parallel(self.network)
        self.step = 0
        # Nebula-I: a link to another cluster's leader (Distributed.cross_cluster); None when not enabled.
        self.cross_cluster = build_cross_cluster(cfg.Distributed.cross_cluster, self.module, self.env,
                                                 cfg.Engine.max_steps)

    # ------------------------------------------------------------------------------------------ setup
    def _tokenizer_for(self, section):
        """The tokenizer a dataset section needs: none for datasets that declare `needs_tokenizer = False`
        (images, or captions from a closed grammar with their own vocabulary)."""
        if not getattr(DATASETS.get(section.dataset, where="Data"), "needs_tokenizer", True):
            return self.tokenizer
        return self._require_tokenizer()

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ConfigError(
                f"Data.tokenizer is not set in {self.cfg.source}, but the datasets need one. Train one with "
                "`python tools/train_tokenizer.py --out output/tokenizer/tokenizer.json` and set "
                "Data.tokenizer to that path (or to a checkpoint's tokenizer.json)."
            )
        return self.tokenizer

    def _check_vocab(self):
        vocab = getattr(self.cfg.Model, "vocab_size", None)
        if self.tokenizer is not None and vocab is not None and vocab < self.tokenizer.vocab_size:
            raise ConfigError(
                f"Model.vocab_size={vocab} is smaller than the tokenizer's vocabulary ({self.tokenizer.vocab_size} "
                f"tokens in {self.tokenizer.source}); set Model.vocab_size to at least {self.tokenizer.vocab_size}."
            )

    def _amp_settings(self):
        mp = self.cfg.Engine.mix_precision
        if not mp.enable:
            return {"enable": False, "dtype": "float32", "level": "O0"}
        if self.device == "cpu":
            # Paddle's CPU kernels have no bf16 matmul/softmax/layer_norm and auto_cast is a no-op there:
            # say so once instead of pretending.
            warnings.warn(
                f"Engine.mix_precision.enable is set but the device is CPU: Paddle has no {mp.dtype} CPU kernels "
                "for matmul and softmax, so training runs in float32. Mixed precision applies on GPU.",
                stacklevel=2,
            )
            return {"enable": False, "dtype": "float32", "level": "O0"}
        return {"enable": True, "dtype": mp.dtype, "level": mp.level}

    def _fused_comm(self):
        """Distributed.se_moe.fused_comm: dense gradients all-reduced in buckets by ppzoo (not DataParallel)
        and the logged scalars averaged in one collective (ppzoo.distributed.fused_comm)."""
        return self.cfg.Distributed.se_moe.fused_comm  # not with pp / sharding: refused by check_se_moe_config

    def _wrap_data_parallel(self, module):
        if self.env.dp_size * self.env.sharding_size <= 1 or self.env.world_size <= 1 or self._fused_comm():
            return module
        from paddle.distributed import fleet

        # fleet picks the wrapper from the hybrid topology (DataParallel for pure dp, TensorParallel with dp
        # gradient sync when mp > 1); it asserts at world size 1, hence the check above.
        return fleet.distributed_model(module)

    def _autocast(self):
        if not self.amp["enable"]:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=True, dtype=self.amp["dtype"], level=self.amp["level"])

    # --------------------------------------------------------------------------------------- training
    def _sampler(self):
        g = self.cfg.Global
        return DistributedBatchSampler(
            len(self.train_dataset),
            g.global_batch_size,
            g.micro_batch_size,
            self.cfg.Engine.accumulate_steps,
            self.env.dp_rank,
            self.env.dp_size * self.env.sharding_size,
            g.seed,
        )

    def _mean_over_dp(self, value):
        if self.env.dp_size <= 1 or self.env.world_size <= 1:
            return value
        t = paddle.to_tensor([value], dtype="float64")
        dist.all_reduce(t, group=self.env.dp_group)
        return float(t.item()) / self.env.dp_size

    def train_step(self, step, sampler):
        """One optimizer step over accumulate_steps micro-batches; returns logged scalars."""
        micro_batches = sampler.indices_for_step(step)
        if self.env.pp_size > 1:
            return self._pipeline_train_step(micro_batches)
        accumulate = len(micro_batches)
        totals, tokens = {}, 0
        for index, indices in enumerate(micro_batches):
            batch = to_tensors(collate([self.train_dataset[i] for i in indices]))
            tokens += self.module.tokens_in_batch(batch)
            last = index == accumulate - 1
            # Skip the data-parallel all-reduce on all but the last micro-batch: gradients accumulate locally.
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with self._autocast():
                    losses = self.model(batch)
                loss = losses["loss"] / accumulate
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + float(value) / accumulate
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        # Expert-parallel weights (MoE experts) are left alone by the data-parallel wrappers: combined here.
        if self._fused_comm():
            allreduce_gradients(self.module.parameters(), self.env.dp_group, self.env.dp_size,
                                int(self.cfg.Distributed.se_moe.bucket_mb * (1 << 20)))
        stored = self.expert_storage.gradient_holders() if self.expert_storage is not None else []
        sync_expert_gradients(list(self.module.parameters()) + stored, self.env)
        if self.cross_cluster is not None:  # Nebula-I data_parallel baseline: average gradients across clusters
            self.cross_cluster.before_optimizer_step()
        grad_norm = None
        if not self.fleet_hybrid:
            grad_norm = clip_grad_norm(list(self.module.parameters()) + stored, self.cfg.Optimizer.grad_clip,
                                       self.env.mp_group, self.env.ep_group)
        lr = self.optimizer.get_lr()
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.expert_storage is not None:
            self.expert_storage.step(lr)
        self.optimizer.clear_grad(set_to_zero=False)
        self.lr_schedule.step()
        if self._fused_comm() and self.env.world_size > 1:
            logged = fused_mean(totals, self.env.dp_group, self.env.dp_size)
        else:
            logged = {name: self._mean_over_dp(value) for name, value in totals.items()}
        logged.update(lr=lr, tokens=tokens * self.env.dp_size * self.env.sharding_size)
        if self.expert_storage is not None:
            logged.update(self.expert_storage.step_metrics())
        if grad_norm is not None:
            logged["grad_norm"] = grad_norm
        return logged

    def _pipeline_train_step(self, micro_batches):
        """GPU pipeline parallel: fleet's schedule runs the step's micro-batches itself."""
        from ppzoo.distributed.gpu_parallel import pipeline_train_step

        indices = [i for micro in micro_batches for i in micro]
        batch = to_tensors(collate([self.train_dataset[i] for i in indices]))
        lr = self.optimizer.get_lr()
        with self._autocast():
            loss = pipeline_train_step(self.model, batch, self.optimizer, self.scaler)
        self.lr_schedule.step()
        return {"loss": self._mean_over_dp(loss), "lr": lr,
                "tokens": self.module.tokens_in_batch(batch) * self.env.dp_size * self.env.sharding_size}

    def fit(self, resume=None):
        """Train to Engine.max_steps; returns a summary dict (also the tool's JSON result)."""
        cfg = self.cfg.Engine
        if self.train_dataset is None:
            raise ConfigError(f"Data.Train is not set in {self.cfg.source}: there is nothing to train on.")
        # Resolve and verify the checkpoint before anything is written, so a bad --resume damages nothing.
        resume_path = ckpt.resolve_resume(resume, self.output_dir) if resume else None
        existing = ckpt.list_checkpoints(self.output_dir) if not resume else []
        if existing:
            # A new run here would mix its checkpoints with the old ones: keep_last pruning counts both (and
            # can delete the new run's checkpoint at once), and a later --resume auto would pick the old run's.
            raise ConfigError(
                f"Engine.output_dir {self.output_dir} already holds checkpoints of an earlier run (newest: "
                f"{existing[-1]}). Continue that run with --resume auto, or start the new run in another "
                "Engine.output_dir (or delete the old checkpoints first)."
            )
        if cfg.init_from and not resume_path:
            self.init_from_checkpoint(cfg.init_from)
        if resume_path:
            self.load_checkpoint(resume_path)
            if self.step > cfg.max_steps:
                raise ConfigError(
                    f"{resume_path} is at step {self.step}, past Engine.max_steps={cfg.max_steps}. Set "
                    f"Engine.max_steps above {self.step} to train on from it (keep Optimizer.lr.decay_steps as "
                    "it was, or the schedule changes)."
                )
        if self.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
            self._truncate_metrics(self.step)
        sampler = self._sampler()
        bar = self._progress_bar()
        # Resuming a finished run trains nothing: the summary then names the checkpoint it already has.
        last, eval_metrics, saved = {}, {}, resume_path
        window_tokens, window_start = 0, time.perf_counter()
        while self.step < cfg.max_steps:
            logged = self.train_step(self.step, sampler)
            self.step += 1
            if self.cross_cluster is not None:  # Nebula-I: sync the shared subset with the other cluster
                logged.update(self.cross_cluster.after_step(self.step))
            window_tokens += logged.pop("tokens")
            is_last = self.step == cfg.max_steps
            if self.step % cfg.logging_freq == 0 or is_last:
                elapsed = time.perf_counter() - window_start
                logged["tokens_per_sec"] = window_tokens / max(elapsed, 1e-9)
                window_tokens, window_start = 0, time.perf_counter()
                if (cfg.eval_freq and self.step % cfg.eval_freq == 0) or is_last:
                    eval_metrics = self.evaluate()
                    logged.update(eval_metrics)
                self._log(logged, bar)
                window_start = time.perf_counter()  # evaluation and logging do not count against throughput
            elif cfg.eval_freq and self.step % cfg.eval_freq == 0:
                eval_started = time.perf_counter()
                eval_metrics = self.evaluate()
                self._log(dict(logged, **eval_metrics), bar)
                window_start += time.perf_counter() - eval_started  # not counted against throughput either
            if (cfg.save_steps and self.step % cfg.save_steps == 0) or is_last:
                saved = self.save_checkpoint()
            last = logged
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if self.cross_cluster is not None:
            self.cross_cluster.close()
            last = dict(last, **self.cross_cluster.stats())
        return {
            "step": self.step,
            "loss": last.get("loss"),
            "tokens_per_sec": last.get("tokens_per_sec"),
            **{k: v for k, v in eval_metrics.items()},
            "checkpoint": saved,
            "output_dir": self.output_dir,
            **({k: v for k, v in last.items() if k.startswith("wan_") or k == "wall_time"}
               if self.cross_cluster is not None else {}),
        }

    # ------------------------------------------------------------------------------------- evaluation
    def evaluate(self, max_batches=None):
        """Mean validation metrics over the first Engine.eval_iters batches of the eval dataset (the same
        batches every time), with perplexity when the module reports a loss."""
        if self.eval_dataset is None:
            return {}
        batch_size = self.cfg.Global.micro_batch_size
        n_batches = min(max_batches or self.cfg.Engine.eval_iters, len(self.eval_dataset) // batch_size)
        if n_batches == 0:
            n_batches, batch_size = 1, len(self.eval_dataset)
        was_training = self.module.training
        self.module.eval()
        totals = {}
        with paddle.no_grad():
            for b in range(n_batches):
                samples = [self.eval_dataset[i] for i in range(b * batch_size, (b + 1) * batch_size)]
                with self._autocast():
                    metrics = self.module.validation_step(to_tensors(collate(samples)))
                for name, value in metrics.items():
                    totals[name] = totals.get(name, 0.0) + float(value) / n_batches
        if was_training:
            self.module.train()
        result = {f"eval_{name}": value for name, value in totals.items()}
        if "eval_loss" in result:
            result["eval_ppl"] = math.exp(min(result["eval_loss"], 50.0))
        return result

    # ---------------------------------------------------------------------------------------- logging
    def _progress_bar(self):
        if not (self.is_main and self.cfg.Engine.progress_bar):
            return None
        from tqdm import tqdm

        # disable=None: the bar shows on a terminal only; logs and CI get plain lines from _log.
        return tqdm(total=self.cfg.Engine.max_steps, initial=self.step, desc="train", disable=None, file=sys.stderr)

    def _log(self, logged, bar):
        if not self.is_main:
            return
        record = {"step": self.step, **{k: (round(v, 8) if isinstance(v, float) else v) for k, v in logged.items()}}
        with open(os.path.join(self.output_dir, METRICS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")
        shown = {"loss": f"{logged['loss']:.4f}", "lr": f"{logged['lr']:.2e}"}
        if "tokens_per_sec" in logged:  # absent from an evaluation step between logging steps
            shown["tok/s"] = f"{logged['tokens_per_sec']:.0f}"
        if "eval_loss" in logged:
            shown["eval_loss"] = f"{logged['eval_loss']:.4f}"
        if bar is not None and not bar.disable:
            bar.set_postfix(shown, refresh=False)
        else:
            print(f"step {self.step}/{self.cfg.Engine.max_steps} " + " ".join(f"{k} {v}" for k, v in shown.items()),
                  flush=True)

    def _truncate_metrics(self, step):
        """Drop logged steps after `step` (a resumed run re-logs them)."""
        path = os.path.join(self.output_dir, METRICS_FILE)
        if not os.path.exists(path):
            return
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)

    # ------------------------------------------------------------------------------------ checkpoints
    def _barrier(self):
        if self.env.world_size > 1:
            dist.barrier()

    def save_checkpoint(self):
        """Write checkpoint step_XXXXXXXX (see ppzoo.core.checkpoint); returns its path."""
        root, r = self.output_dir, self._shard_name()
        if self.is_main:
            ckpt.begin(root, self.step)
        self._barrier()
        tmp = ckpt.temporary_dir(root, self.step)
        # One writer per distinct shard: dp rank 0, or under expert parallelism the first ep group's ranks.
        if self.env.dp_rank < self.env.ep_size:
            model_state = self.network.state_dict()
            optimizer_state = _rename_optimizer_state(self.optimizer.state_dict(), self._paddle_to_structured_names())
            if self.expert_storage is not None:  # the same files and names as the all-in-memory run's
                model_state.update(self.expert_storage.model_state())
                optimizer_state.update(self.expert_storage.optimizer_state())
            paddle.save(model_state, os.path.join(tmp, f"model.{r}.pdparams"))
            paddle.save(optimizer_state,
                        os.path.join(tmp, f"optimizer.{r}.pdopt"))
            paddle.save({"paddle": paddle.get_rng_state()}, os.path.join(tmp, f"rng.{r}.pdrng"))
        if self.is_main:
            np_state = np.random.get_state()
            state = {
                "step": self.step,
                "consumed_samples": self.step * self.cfg.Global.global_batch_size,
                "mp_size": self.env.mp_size,
                "ep_size": self.env.ep_size,
                "config": config_to_dict(self.cfg),
                "python_random": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
                "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            }
            ckpt.write_json(os.path.join(tmp, ckpt.TRAINER_STATE), state)
            if self.tokenizer is not None:
                self.tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        self._barrier()
        final = None
        if self.is_main:
            final = ckpt.commit(root, self.step, self.cfg.Engine.keep_last)
        self._barrier()
        return final or os.path.join(root, ckpt.step_dir_name(self.step))

    def _paddle_to_structured_names(self):
        return {param.name: name for name, param in self.network.named_parameters()}

    def _shard_name(self):
        """This rank's part of a checkpoint: `mp0` on one process; pipeline stages and optimizer-state
        shards (GPU) add `.pp1` / `.sh1`. Data-parallel replicas are identical and share one file."""
        name = f"mp{self.env.mp_rank}"
        if self.env.ep_size > 1:
            name += f".ep{self.env.ep_rank}"  # this rank's experts (and any rank-local gates)
        if self.env.pp_size > 1:
            name += f".pp{self.env.pp_rank}"
        if self.env.sharding_size > 1:
            name += f".sh{self.env.sharding_rank}"
        return name

    def load_checkpoint(self, path):
        """Restore model, optimizer, LR schedule, step (the data position follows from it) and random state."""
        state = ckpt.read_trainer_state(path)
        if state.get("mp_size", 1) != self.env.mp_size:
            raise CheckpointError(
                f"{path} was saved with Distributed.mp_degree={state.get('mp_size')} but this run uses "
                f"mp_degree={self.env.mp_size}; resume with the same tensor-parallel degree."
            )
        r = self._shard_name()
        saved_ep = state.get("ep_size", 1)
        if saved_ep == self.env.ep_size:
            model_state = paddle.load(os.path.join(path, f"model.{r}.pdparams"))
            optimizer_state = paddle.load(os.path.join(path, f"optimizer.{r}.pdopt"))
            rng_file = f"rng.{r}.pdrng"
        else:
            # Elastic: the checkpoint's experts were spread over another ep degree. Every shard is read and
            # merged (experts are named by global index), and this rank keeps the experts it now holds.
            model_state = ckpt.merge_expert_shards(path, "model", "pdparams", self.env.mp_rank, saved_ep)
            optimizer_state = ckpt.merge_expert_shards(path, "optimizer", "pdopt", self.env.mp_rank, saved_ep)
            own = set(self.network.state_dict())
            if self.expert_storage is not None:
                own |= set(self.expert_storage.model_state())
            model_state = {k: v for k, v in model_state.items() if k in own}
            optimizer_state = ckpt.keep_optimizer_state_of(optimizer_state, own)
            rng_file = ckpt.shard_file(path, "rng", "pdrng", self.env.mp_rank, saved_ep,
                                       min(self.env.ep_rank, saved_ep - 1))
        if self.expert_storage is not None:
            self.expert_storage.load_state(model_state, optimizer_state)
        self.network.set_state_dict(model_state)
        structured_to_paddle = {v: k for k, v in self._paddle_to_structured_names().items()}
        self.optimizer.set_state_dict(_rename_optimizer_state(optimizer_state, structured_to_paddle))
        paddle.set_rng_state(paddle.load(os.path.join(path, rng_file))["paddle"])
        py = state["python_random"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        np_state = state["numpy_random"]
        np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
        self.step = state["step"]
        return state

    def init_from_checkpoint(self, path):
        """Load only the model weights of checkpoint `path` (Engine.init_from) into this fresh run.

        For continual pretraining (a longer seq_len, another rope_theta): the weights carry over, while the
        step, optimizer state, LR schedule and data order start anew. The checkpoint must have this run's
        parallel layout (its model.<shard>.pdparams files) and every tensor's shape; anything else is an
        error naming the tensor, never a silent partial load."""
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, ckpt.MANIFEST)) and ckpt.list_checkpoints(path):
            path = ckpt.list_checkpoints(path)[-1]  # a run's output directory: its newest checkpoint
        where = f"Engine.init_from={path} (in {self.cfg.source})"
        if not os.path.isdir(path):
            raise CheckpointError(f"{where}: no such checkpoint directory (expected output_dir/step_XXXXXXXX).")
        ckpt.verify(path)
        state = ckpt.read_trainer_state(path)
        shard = os.path.join(path, f"model.{self._shard_name()}.pdparams")
        if state.get("mp_size", 1) != self.env.mp_size or not os.path.isfile(shard):
            raise CheckpointError(
                f"{where}: the checkpoint was saved with mp_degree={state.get('mp_size', 1)} and this run "
                f"(mp_degree={self.env.mp_size}, pp_degree={self.env.pp_size}) needs its "
                f"{os.path.basename(shard)}; initialize from a checkpoint with the same tensor- and "
                "pipeline-parallel layout."
            )
        loaded = paddle.load(shard)
        if self.expert_storage is not None:  # the experts' weights go to the storage (fresh optimizer states)
            self.expert_storage.load_state(loaded, {})
        own = self.network.state_dict()
        # Parts the module adds to a pretrained model (Module.init_from_skips) keep their fresh initialization.
        skips = tuple(self.module.init_from_skips())
        own_loaded = {name: param for name, param in own.items() if not (name not in loaded and name.startswith(skips))}
        missing = [name for name in own_loaded if name not in loaded]
        unexpected = [name for name in loaded if name not in own]
        if missing or unexpected:
            raise CheckpointError(
                f"{where}: the checkpoint's tensors do not match the model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}. Model.module and the architecture must be the checkpoint's."
            )
        for name, param in own_loaded.items():
            if list(loaded[name].shape) != list(param.shape):
                raise CheckpointError(
                    f"{where}: tensor {name} has shape {list(loaded[name].shape)} in the checkpoint but "
                    f"{list(param.shape)} in this model. Only seq_len, rope_theta / rope_position_scale and "
                    "max_position_embeddings may change; the other Model sizes must be the checkpoint's."
                )
        # Cast to the run's dtypes (e.g. fp32 weights into a bf16 O2 run); set_state_dict does not. Skipped
        # tensors are given their own values (set_state_dict warns about every tensor it is not given).
        self.network.set_state_dict({name: loaded[name].astype(param.dtype) if name in own_loaded else param
                                     for name, param in own.items()})
        return state


def _rename_optimizer_state(state, names):
    """The optimizer state dict with parameter names replaced by `names[old]`.

    Paddle keys optimizer state by the parameters' unique names (`linear_3.w_0_moment1_0`), which depend on
    how many layers the process created before the model. Checkpoints store the module's structured names
    instead (`model.lm_head.weight_moment1_0`), so they load in any process, e.g. after another Engine was
    built in the same one. Keys of neither form (LR_Scheduler) pass through.
    """
    by_length = sorted(names, key=len, reverse=True)  # "a.w_0" must not claim "a.w_0_x"'s state
    renamed = {}
    for key, value in state.items():
        if key == "master_weights" and isinstance(value, dict):
            value = {names.get(name, name): weight for name, weight in value.items()}
        elif key != "LR_Scheduler":
            old = next((name for name in by_length if key.startswith(name + "_")), None)
            if old is not None:
                key = names[old] + key[len(old):]
        renamed[key] = value
    return renamed


def load_module_weights(module, path, mp_rank=0):
    """Load only the model weights of a checkpoint (for eval, export and inference)."""
    ckpt.verify(path)
    module.set_state_dict(paddle.load(os.path.join(path, f"model.mp{mp_rank}.pdparams")))
    return ckpt.read_trainer_state(path)
