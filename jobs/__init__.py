"""Jobs, schedules, sensors and automation. Each module may define JOBS, SCHEDULES and SENSORS lists."""

from jobs import automation, ingestion, steps, training

JOB_MODULES = [steps, ingestion, automation, training]
