"""Facts datasets, prompt formats, splits and retain text."""
