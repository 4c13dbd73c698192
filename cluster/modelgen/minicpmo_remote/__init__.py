"""Remote-code modules that ``make-model --arch minicpm_o_26`` copies into the model directory.

Written for fleetserve (not copied from OpenBMB's repository): they implement
what vLLM's MiniCPM-O support reads through ``trust_remote_code`` -- the
config class, the slicing image processor, the tokenizer's token-id
attributes and the processor that bundles them. They are loaded by
``transformers`` from the model directory, so each file imports only
``transformers``/``numpy``/``torch`` and its siblings (relative imports).
"""
