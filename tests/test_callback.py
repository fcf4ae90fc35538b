"""AstraNAQCallback with a real transformers.Trainer: codebook init, loss going down, logs, schedule, 2 ranks."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_pair, tiny_gpt2_config
from test_distributed import free_port
from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import transformers_astra as astra
from transformers_astra.callback import set_noise_scale


class TokenBlocks(torch.utils.data.Dataset):
    """A learnable language: each sequence counts up from a random start (mod the vocabulary)."""

    def __init__(self, rows: int = 64, length: int = 16, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(3, 61, (rows, 1), generator=generator)
        self.ids = (starts + torch.arange(length)) % 58 + 3

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class LogRecorder(TrainerCallback):
    """Stands for a reporting integration (TensorBoard, W&B): keeps every ``logs`` dict it is shown."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def training_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=3e-3, max_steps=24, logging_steps=8,
        report_to="none", save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def patched_gpt2(**config):
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    astra.patch(model, astra.AstraConfig(**{"num_devices": 2, "groups": 4, "codebook_size": 16, **config}))
    return model.train()


def test_finetuning_initialises_codebooks_lowers_the_loss_and_logs_code_statistics(tmp_path):
    model = patched_gpt2()
    assert not any(bool(q.initialized) for q in astra.quantizers(model))
    recorder = LogRecorder()
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenBlocks(), callbacks=[recorder])
    astra.AstraNAQCallback(calibration_batches=2).attach(trainer)
    trainer.train()
    assert all(bool(q.initialized) for q in astra.quantizers(model))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and losses[-1] < losses[0]
    # The recorder comes before the ASTRA callback in callbacks=, as the Trainer's reporters do: attached, the
    # ASTRA callback runs first and the recorder sees the stats.
    step_logs = [logs for logs in recorder.logs if "loss" in logs]
    assert all("astra/code_perplexity" in logs and "astra/dead_codes" in logs for logs in step_logs)
    for logs in step_logs:
        assert 1.0 <= logs["astra/code_perplexity"] <= 16.0 and 0.0 < logs["astra/code_usage"] <= 1.0
    assert "astra/code_usage" in trainer.state.log_history[0]


def test_unused_codes_are_reseeded_from_recent_inputs(tmp_path):
    model = patched_gpt2()
    quantizer = astra.quantizers(model)[0]
    with torch.no_grad():  # an initialised codebook whose last 8 codewords no input can ever pick
        quantizer.codebook.normal_()
        quantizer.codebook[:, 8:] = 1e4
        quantizer.initialized.fill_(True)
    for other in astra.quantizers(model)[1:]:
        other.initialized.fill_(True)
    callback = astra.AstraNAQCallback()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=16), train_dataset=TokenBlocks(), callbacks=[callback])
    trainer.train()
    assert callback.codes_reset > 0
    assert quantizer.codebook[:, 8:].abs().max() < 1e3  # the far-away codewords were moved to real inputs


def test_noise_warmup_schedule_and_setter():
    model = patched_gpt2(noise_scale=1.0)
    callback = astra.AstraNAQCallback(noise_schedule="warmup", noise_warmup_ratio=0.5)
    callback.target_noise_scale = 1.0
    assert callback.current_noise_scale(0, 100) == 0.0
    assert callback.current_noise_scale(25, 100) == pytest.approx(0.5)
    assert callback.current_noise_scale(80, 100) == 1.0
    set_noise_scale(model, 0.3)
    assert model._astra_state.config.noise_scale == 0.3 and model.config.quantization_config.noise_scale == 0.3
    with pytest.raises(ValueError, match="noise_scale"):
        set_noise_scale(model, -1.0)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="noise_schedule"):
        astra.AstraNAQCallback(noise_schedule="cosine")
    with pytest.raises(ValueError, match="noise_warmup_ratio"):
        astra.AstraNAQCallback(noise_warmup_ratio=0.0)


def join_ranks(rank: int, world_size: int, port: int) -> None:
    """The environment a launcher gives rank ``rank`` (the Trainer then starts the gloo group)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)


def run_two_ranks(worker, tmp_path) -> dict:
    """Runs ``worker(rank, 2, port, output_dir, results)`` in two processes; returns what they put in ``results``."""
    results = mp.Manager().dict()
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), results), nprocs=2, join=True)
    return dict(results)


def _train_on_rank(rank: int, world_size: int, port: int, output_dir: str, results) -> None:
    join_ranks(rank, world_size, port)
    model = patched_gpt2()
    args = training_args(output_dir, max_steps=16, ddp_backend="gloo")
    # A different data order per rank: k-means on each rank's own batches would give different codebooks.
    trainer = Trainer(model=model, args=args, train_dataset=TokenBlocks(seed=rank), callbacks=[astra.AstraNAQCallback()])
    trainer.train()
    results[rank] = [q.codebook.detach().clone() for q in astra.quantizers(model)]
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_keep_identical_codebooks(tmp_path):
    results = run_two_ranks(_train_on_rank, tmp_path)
    for first, second in zip(results[0], results[1]):
        assert torch.equal(first, second)
    assert not torch.equal(results[0][0], astra.quantizers(patched_gpt2())[0].codebook.detach())


def test_attach_puts_the_callback_right_after_the_flow_callback_once(tmp_path):
    recorder = LogRecorder()
    callback = astra.AstraNAQCallback()
    trainer = Trainer(model=patched_gpt2(), args=training_args(tmp_path), train_dataset=TokenBlocks(), callbacks=[recorder, callback])
    names = lambda: [type(cb).__name__ for cb in trainer.callback_handler.callbacks]  # noqa: E731
    assert names().index("AstraNAQCallback") > names().index("LogRecorder")
    assert callback.attach(trainer) is callback
    assert names()[names().index("DefaultFlowCallback") + 1] == "AstraNAQCallback"
    assert names().count("AstraNAQCallback") == 1 and names().index("LogRecorder") > names().index("AstraNAQCallback")


def test_without_attach_the_statistics_still_reach_the_log_history(tmp_path):
    recorder = LogRecorder()
    trainer = Trainer(
        model=patched_gpt2(), args=training_args(tmp_path, max_steps=8), train_dataset=TokenBlocks(),
        callbacks=[recorder, astra.AstraNAQCallback(calibration_batches=1)],
    )
    trainer.train()
    assert "astra/code_usage" in trainer.state.log_history[0]
    assert "astra/code_usage" not in recorder.logs[0]  # an earlier callback (a reporter) ran before it


class StopAt(TrainerCallback):
    """Simulates a crash after a given step (the checkpoint of an earlier step is on disk)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def resumable_args(output_dir, restore_flag: bool) -> TrainingArguments:
    # 16 steps, logs (and dead-code resets) every 4, checkpoints every 6: checkpoint-6 is mid-window (counts
    # pending) and mid-warm-up, and the reset at step 8 draws from a generator the reset at step 4 advanced.
    return training_args(
        output_dir, max_steps=16, logging_steps=4, save_strategy="steps", save_steps=6,
        restore_callback_states_from_checkpoint=restore_flag,
    )


def naq_callback():
    return astra.AstraNAQCallback(calibration_batches=2, noise_schedule="warmup", noise_warmup_ratio=0.5)


def run_outcome(trainer, model):
    history = [{k: v for k, v in entry.items() if k.startswith("astra/") or k in ("loss", "step")}
               for entry in trainer.state.log_history if "loss" in entry]
    return {name: value.detach().clone() for name, value in model.state_dict().items()}, history


@pytest.mark.parametrize("restore_flag", [False, True])
def test_resumed_training_equals_the_uninterrupted_run_bit_for_bit(tmp_path, restore_flag):
    model = patched_gpt2(noise_scale=1.0, codebook_size=64)
    trainer = Trainer(model=model, args=resumable_args(tmp_path / "a", restore_flag), train_dataset=TokenBlocks())
    naq_callback().attach(trainer)
    trainer.train()
    want_weights, want_history = run_outcome(trainer, model)
    assert want_history[2]["astra/codes_reset"] > want_history[0]["astra/codes_reset"] > 0  # resets at 4 and 8

    # The same run, crashed after step 7, then resumed from checkpoint-6 with the same (now mid-warm-up) model object.
    model = patched_gpt2(noise_scale=1.0, codebook_size=64)
    trainer = Trainer(model=model, args=resumable_args(tmp_path / "b", restore_flag), train_dataset=TokenBlocks(), callbacks=[StopAt(7)])
    naq_callback().attach(trainer)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert 0 < model._astra_state.config.noise_scale < 1.0
    trainer = Trainer(model=model, args=resumable_args(tmp_path / "b", restore_flag), train_dataset=TokenBlocks())
    naq_callback().attach(trainer)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-6"))
    got_weights, got_history = run_outcome(trainer, model)
    # The Trainer's own logged loss at the first log after a resume averages only the steps since the
    # resume (7 and 8, against 5 to 8): a transformers quirk, not a divergence; every other entry is equal.
    assert got_history[1].pop("loss") != want_history[1].pop("loss")
    assert got_history == want_history
    assert got_weights.keys() == want_weights.keys()
    for name in want_weights:
        assert torch.equal(got_weights[name], want_weights[name]), name
    assert model._astra_state.config.noise_scale == 1.0


def _calibrate_nan_on_rank(rank: int, world_size: int, port: int, output_dir: str, results) -> None:
    join_ranks(rank, world_size, port)
    model = patched_gpt2()
    embeds = torch.randn(4, 16, 32)
    embeds[0, 3, 5] = float("nan")
    callback = astra.AstraNAQCallback(calibration_data=[{"inputs_embeds": embeds}])
    trainer = Trainer(model=model, args=training_args(output_dir, max_steps=2, ddp_backend="gloo", ddp_timeout=60),
                      train_dataset=TokenBlocks(), callbacks=[callback])
    try:
        trainer.train()
        results[rank] = "trained"
    except ValueError as error:
        results[rank] = str(error)
    results[f"initialized{rank}"] = any(bool(q.initialized) for q in astra.quantizers(model))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_nan_in_calibration_stops_every_rank_by_name(tmp_path):
    results = run_two_ranks(_calibrate_nan_on_rank, tmp_path)
    assert "calibration batch 0: layer 0's activations hold 32 NaN" in results[0]
    assert "k-means on rank 0 failed" in results[1]
    assert not results["initialized0"] and not results["initialized1"]
