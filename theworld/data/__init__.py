"""Training data for TheWorld: sample sources, the safety filter in the data path, the collator.

Every source yields samples in one format (see ``theworld.data.sources``)::

    {"id": str,
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]},
                  {"role": "assistant", "content": [{"type": "text", "text": ...}]}],
     "images": [np.ndarray uint8 HxWx3, ...]}
"""
