"""Operator tools over an output location, and their subcommands: plan (what a run would do),
report (how runs went), export (subtitles and transcripts), status, maintain and migrate."""
