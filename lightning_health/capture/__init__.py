"""Which modules are read and what each activation can do (``selection``), and the hooks (``hooks``).

May import ``readings`` (the hooks reduce on the device as soon as a tensor is seen), never
``pipeline``, ``diagnosis`` or ``sinks``.
"""
