"""What runs in a Celery worker: the app, the pipeline task, the cancellation core and signal wiring."""
