# andon: one image for the migrations, the API, the workers and Flower (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ANDON_HOME=/var/lib/andon

RUN groupadd --system --gid 10001 andon \
 && useradd --system --uid 10001 --gid andon --home-dir /var/lib/andon --create-home --shell /usr/sbin/nologin andon

WORKDIR /app
# Only what the package needs (no .venv, .git or local state in the image).
COPY pyproject.toml README.md ./
COPY tasks ./tasks
COPY db ./db
COPY api ./api
RUN pip install ".[postgres]" \
 && rm -rf /app/build /app/*.egg-info

USER andon:andon
EXPOSE 8000 5555
# Each compose service sets its own command; this default serves the API.
CMD ["uvicorn", "api.app:app", "--host", "0.0.0.0", "--port", "8000"]
