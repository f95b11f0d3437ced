"""The reference's PyTorch weights, read and written without torch.

- `pth_io`: `load_pth` / `save_pth`, a restricted-unpickler reader and a writer of torch's
  zip `.pth` format;
- `safetensors_io`: `load_safetensors` / `save_safetensors`, a validating reader and a
  writer of the `.safetensors` format;
- `limits`: the memory budget both readers charge before allocating;
- `keymap`: `KEY_MAP`, the one table between the reference's tensor names and NNX paths;
- `mapping`: `load_reference_weights` / `export_reference_weights`, which move a checkpoint
  dict into an `SMFNet` and back through that table, with shape checks that name the key.

`python -m convert.main` is the command-line front end.
"""
