"""quanta: real int8 models from any nn.Module."""
