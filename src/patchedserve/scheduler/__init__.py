"""Scheduling: which requests run in the next denoising step."""

from patchedserve.scheduler.fcfs import FCFSScheduler
from patchedserve.scheduler.interface import Scheduler, SchedulerOutput, StepOutcome

__all__ = ["FCFSScheduler", "Scheduler", "SchedulerOutput", "StepOutcome"]
