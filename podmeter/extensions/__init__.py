"""Extensions that run beside pipelines."""
