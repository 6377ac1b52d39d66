"""xstars: rebuild a multi-sensor EO dataset over France and pretrain sensor-agnostic models.

The data flow, one module per stage::

    sites -> catalog -> acquire -> coregister -> store -> data -> model/losses -> train -> evaluate

``xstars.demo`` generates and serves an offline synthetic world that looks, to every stage,
like the real Planetary Computer and IGN Géoplateforme services.
"""

__version__ = "0.1.0"
