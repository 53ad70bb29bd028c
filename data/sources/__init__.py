"""Builders that turn real screens (RxRx1, RxRx3-core, JUMP-CP cpg0016, any CSV of files) into crop datasets.

One command each: `python -m data.sources.<rxrx1|rxrx3_core|jump_cp|generic> --source_dir ... --out ...`
(see docs/real_data.md). Each module defines a `data.crop_builder.Source`; the build itself is shared.
"""
