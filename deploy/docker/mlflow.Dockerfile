# MLflow tracking and registry server for docker-compose.yml: PostgreSQL store (psycopg2) and
# S3 artifacts (boto3), which the upstream image leaves out. Build from the repository root.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 HOME=/tmp
WORKDIR /app
COPY constraints.txt ./
RUN pip install -c constraints.txt mlflow psycopg2-binary boto3 \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin mlflow
USER 10001
# The job runner triples the server's memory and Flywheel runs no MLflow jobs.
ENV MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
