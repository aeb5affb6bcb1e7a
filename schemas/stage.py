"""Column names of the batches that cross Ray Data stage boundaries.

These are internal (not written to Parquet) but, like the output tables, defined only here.
Audio travels as raw little-endian float32 bytes so that a window is one binary cell.
"""

# kind column values
KIND_WINDOW = "window"          # decode -> infer: one audio window
KIND_FILE = "file"              # decode -> infer -> driver: the file's FileInfo, passed through
KIND_SEGMENT = "segment"        # infer -> driver: one (window, task) result
KIND_WINDOW_ERROR = "window_error"  # infer -> driver: a window that failed inference for good

# decode -> infer
WINDOW_COLUMNS = (
    "kind", "file_id", "uri", "segment_index", "start_s", "end_s", "samples", "is_silent", "file_info",
)

# infer -> driver
RESULT_COLUMNS = (
    "kind", "file_id", "uri", "segment_index", "start_s", "end_s", "task", "prompt", "text",
    "lora_scale", "num_beams", "n_output_tokens", "finish_reason", "file_info", "error",
)
