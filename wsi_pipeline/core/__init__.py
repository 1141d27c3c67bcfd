"""The base every layer stands on: errors, output names, atomic writes, progress, memory, file inventories."""
