"""Tests of the job machinery shared by the trainer and the compressor."""
