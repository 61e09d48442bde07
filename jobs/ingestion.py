"""Jobs, sensors and schedules for ingestion."""
