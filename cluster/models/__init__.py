"""Models built locally, with no model hub: the demo tokenizer, target and draft trained on the
Python standard library's source, and random-weight models of real shapes.

    cache           recipe hashes, the models directory, building once into a locked cache dir
    recipe          DemoRecipe: every knob of the demo build, and the hashes that name its dirs
    corpus          the stdlib *.py files the demo trains on, split into train and held-out
    tokenizer       loading tokenizers; training and caching the demo tokenizer
    checkpoint      writing a loadable model directory (weights, configs, tokenizer files)
    demo            training the demo target and distilling its draft (build_demo_models)
    random_weights  random-weight Llama presets (write_random_model)

Import from the submodules; this package module imports nothing, so that loading the tokenizer
loaders (the router does) does not load the training code.
"""
