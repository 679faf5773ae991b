"""Budgeted runs: the learning rate follows nnU-Net's poly schedule over the elapsed fraction of the budget,
the stop and the rate survive a --c resume, and the loop keeps nnU-Net's hooks."""
import numpy as np
import pytest
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_diffusion.trainers.common import budget
from nnunet_diffusion.trainers.common.budget import ELAPSED_LOG_KEY, BudgetDrivenSchedule, TrainingBudgetMixin
from nnunet_diffusion.trainers.common.fault_safety import FaultSafetyMixin


def poly(lr0, fraction, exponent=0.9):
    return lr0 * (1 - fraction) ** exponent


def test_schedule_follows_the_budget_fraction_not_the_epoch():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    schedule = BudgetDrivenSchedule(PolyLRScheduler(optimizer, 0.01, 1000))
    for fraction in (0.0, 0.25, 0.5, 0.9):
        schedule.set_fraction(fraction)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(poly(0.01, fraction))
    schedule.step(3)  # nnU-Net calls step(epoch) at every epoch start: the epoch must not reset the rate
    assert optimizer.param_groups[0]["lr"] == pytest.approx(poly(0.01, 0.9))
    schedule.set_fraction(1.7)  # past the budget: the smallest rate, still > 0
    assert 0 < optimizer.param_groups[0]["lr"] == pytest.approx(poly(0.01, 0.999))


def test_schedule_without_poly_interface_is_refused():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    with pytest.raises(TypeError, match="PolyLRScheduler"):
        BudgetDrivenSchedule(torch.optim.lr_scheduler.StepLR(optimizer, 10))


class _Logger:
    def __init__(self):
        self.local_logger = self
        self.my_fantastic_logging = {}

    def log(self, key, value, epoch):
        values = self.my_fantastic_logging.setdefault(key, [])
        assert len(values) == epoch, f"{key} logged twice or skipped at epoch {epoch}"
        values.append(value)


class _FakeTrainer:
    """The nnUNetTrainer hooks run_training calls, recording what happened; each train step costs 10 s."""

    def __init__(self, clock, current_epoch=0, logger=None):
        self.clock, self.current_epoch, self.num_epochs = clock, current_epoch, 100
        self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 4, 1
        self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
        self.lr_scheduler = PolyLRScheduler(self.optimizer, 0.01, self.num_epochs)
        self.logger = logger or _Logger()
        self.is_ddp, self.device, self.local_rank, self.output_folder = False, torch.device("cpu"), 1, None
        self.lrs, self.events = [], []
        self.dataloader_train = self.dataloader_val = iter(range(10 ** 6))

    def on_train_start(self): self.events.append("train_start")
    def on_epoch_start(self): self.events.append("epoch_start")
    def on_train_epoch_start(self): self.lr_scheduler.step(self.current_epoch)
    def on_train_epoch_end(self, outputs): pass
    def on_validation_epoch_start(self): pass
    def validation_step(self, batch): return {}
    def on_validation_epoch_end(self, outputs): pass
    def on_train_end(self): self.events.append("train_end")
    def print_to_log_file(self, *args): pass

    def on_epoch_end(self):
        self.current_epoch += 1

    def train_step(self, batch):
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        self.clock[0] += 10.0
        return {}


class _Budgeted(TrainingBudgetMixin, _FakeTrainer):
    def __init__(self, clock, budget_s, **kwargs):
        _FakeTrainer.__init__(self, clock, **kwargs)  # the mixin's __init__ needs nnU-Net's arguments
        self.time_budget_s = budget_s


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(budget, "perf_counter", lambda: now[0])
    return now


def test_budgeted_loop_anneals_per_iteration_and_stops_after_the_budget(clock):
    trainer = _Budgeted(clock, budget_s=75.0)
    trainer.run_training()
    # 10 s per iteration: the iteration that passes 75 s is the 8th; the epoch is closed and the run ends
    assert len(trainer.lrs) == 8 and trainer.current_epoch == 2
    assert trainer.lrs == pytest.approx([poly(0.01, 10 * i / 75) for i in range(8)])
    assert trainer.logger.my_fantastic_logging[ELAPSED_LOG_KEY] == [40.0, 80.0]
    assert trainer.events[0] == "train_start" and trainer.events[-1] == "train_end"


def test_resume_continues_the_budget_where_the_checkpoint_stopped(clock):
    logger = _Logger()
    logger.my_fantastic_logging[ELAPSED_LOG_KEY] = [40.0]  # one epoch of a 75 s budget done before the kill
    trainer = _Budgeted(clock, budget_s=75.0, current_epoch=1, logger=logger)
    trainer.run_training()
    assert trainer.lrs == pytest.approx([poly(0.01, (40 + 10 * i) / 75) for i in range(4)])
    assert logger.my_fantastic_logging[ELAPSED_LOG_KEY] == [40.0, 80.0]


def test_unbudgeted_loop_is_nnunets_epoch_schedule(clock):
    trainer = _Budgeted(clock, budget_s=None)
    trainer.num_epochs = 2
    trainer.run_training()
    assert trainer.lrs == pytest.approx([poly(0.01, 0.0)] * 4 + [poly(0.01, 1 / 100)] * 4)  # epoch-based
    assert ELAPSED_LOG_KEY not in trainer.logger.my_fantastic_logging


@pytest.mark.parametrize("raw,expected", [("", None), ("none", ()), ("2", (2,)), ("2, 0", (0, 2))])
def test_mirror_axes_setting(raw, expected):
    assert budget.read_mirror_axes(3, {budget.ENV_MIRROR_AXES: raw}) == expected


@pytest.mark.parametrize("raw", ["3", "x", "-1", ","])
def test_bad_mirror_axes_are_refused_with_the_valid_range(raw):
    with pytest.raises(ValueError, match=r"must be 'none' or comma-separated axes in 0..2"):
        budget.read_mirror_axes(3, {budget.ENV_MIRROR_AXES: raw})


class _NanTrainer(_Budgeted):
    """Training losses from a list (NaN, inf or finite), one per step."""

    def __init__(self, losses):
        super().__init__([0.0], None)
        self.losses, self.output_folder = iter(losses), "/results/fold_0"

    def train_step(self, batch):
        super().train_step(batch)
        return {"loss": np.array(next(self.losses))}


def test_training_stops_after_three_consecutive_non_finite_losses_before_the_epoch_checkpoint():
    trainer = _NanTrainer([1.0, float("nan"), float("inf"), 0.5, float("nan"), float("nan"), float("nan"), 1.0])
    with pytest.raises(FloatingPointError, match=r"not finite \(NaN or inf\) in 3 consecutive iterations \(epoch 1\)"
                                                 r".*never overwritten.*lower learning rate, or float32"):
        trainer.run_training()
    assert trainer.current_epoch == 1  # epoch 0 (one NaN, one inf, then finite) ended; epoch 1 never did


def test_checkpoints_are_renamed_into_place_and_a_non_finite_model_is_never_written(tmp_path):
    class Writer:
        def save_checkpoint(self, filename):
            with open(filename, "wb") as f:
                f.write(b"new" * 10)
                if self.killed:
                    raise KeyboardInterrupt  # the process dies mid-write

    class Trainer(FaultSafetyMixin, Writer):
        local_rank, disable_checkpointing, is_ddp = 0, False, False

        def __init__(self):
            self.killed, self.network = False, torch.nn.Linear(2, 2)

    target = tmp_path / "checkpoint_latest.pth"
    target.write_bytes(b"old")
    trainer = Trainer()
    trainer.killed = True
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(target))
    assert target.read_bytes() == b"old"
    trainer.killed = False
    with torch.no_grad():
        trainer.network.bias[1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"Not writing .*checkpoint_latest.pth: the model has non-finite "
                                                 r"weights \(bias\); the checkpoints already in that folder are kept"):
        trainer.save_checkpoint(str(target))
    assert target.read_bytes() == b"old"
    with torch.no_grad():
        trainer.network.bias[1] = 0.0
    trainer.save_checkpoint(str(target))
    assert target.read_bytes() == b"new" * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.pth"]  # the partial file was renamed


def test_an_update_with_a_non_finite_gradient_is_skipped():
    class Trainer(TrainingBudgetMixin):
        grad_scaler = None

        def __init__(self):
            torch.manual_seed(0)
            self.network = torch.nn.Linear(2, 1)
            self.optimizer = torch.optim.SGD(self.network.parameters(), lr=0.1)

    trainer, x = Trainer(), torch.ones(4, 2)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.backward_and_step(trainer.network(x).sum() * float("nan"))
    for p, b in zip(trainer.network.parameters(), before):
        assert torch.equal(p, b) and p.grad is None  # NaN never reached the weights
    trainer.backward_and_step(trainer.network(x).sum())
    weight, bias = trainer.network.parameters()
    torch.testing.assert_close(bias, before[1] - 0.1 * 4)  # d(sum)/d(bias) = 4: the finite step is taken
