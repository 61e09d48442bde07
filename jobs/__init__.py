"""Jobs, schedules, sensors and automation. Each module may define JOBS, SCHEDULES and SENSORS lists."""

from jobs import automation, ingestion, training

JOB_MODULES = [ingestion, automation, training]
