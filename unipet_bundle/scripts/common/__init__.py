"""The common floor: what every package may import. Nothing here imports another ``scripts`` package
(``tests/test_import_layers.py``; the layers are in ``docs/code_map.md``).

- :mod:`.errors`: the bundle's error types and the one error hook (one ``error:`` line, exit status 2);
- :mod:`.cli`: the benchmarks' ``fire`` command line, whose bad input ends in that one line (``run_command``);
- :mod:`.options`: command-line option values (``as_bool``, voxel sizes, output formats);
- :mod:`.io`: atomic writes, output-path checks, the modes of new files and folders;
- :mod:`.geometry`: voxel size from an affine;
- :mod:`.versioning`: the bundle version from ``configs/metadata.json``;
- :mod:`.weights`: network weights read in one place (SHA-256, ``weights_only``, unwrap, provenance);
- :mod:`.large_files`: the ``large_files.yml`` record of the shipped weights' SHA-256.
- :mod:`.allocator`: freed host memory kept for reuse (glibc ``mallopt``; the configs' ``host_memory_cache_mb``).
- :mod:`.parallel_gzip`: a gzip writer that compresses on every core (one ordinary gzip member, pigz's way).
- :mod:`.vml_dispatch`: oneMKL's VML kernels resolved once per process before any multi-threaded first call
  (reproducible float unary ops: PyTorch issue 188792).
"""
