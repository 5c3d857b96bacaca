"""The inference log worker: ``inference.logged`` in batches, Parquet files in S3 out.

It runs as its own process (``python -m flywheel_inference_bff.logworker``) beside the BFF, so a
slow S3 never slows a prediction. Each batch is grouped by model line and the UTC hour its rows
were served, one Parquet file per group under hive-style partitions::

    inference/model_line=<line>/date=YYYY-MM-DD/hour=HH/<batch-id>.parquet

Messages are acknowledged only after every file of their batch is written. Exactly-once is
reached in two layers: the batch id is a hash of the batch's event ids, so a batch written again
after a failed or unacknowledged attempt overwrites its own files; and the reader drops repeated
event ids, which covers a batch that the broker redelivered in a different composition (after
a crash or a lost channel).
"""
