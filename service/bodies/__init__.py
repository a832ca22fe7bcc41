"""Request bodies in one place: media types, decoders, limits and the memory budget.

* :mod:`~service.bodies.media`: request media types (``Content-Type``), ``Accept``
  negotiation and the columnar ``.npz`` answer;
* :mod:`~service.bodies.certify`: the certify decoders, one per media type, from a table;
* :mod:`~service.bodies.json_body`, :mod:`~service.bodies.npy`,
  :mod:`~service.bodies.npy_stream`, :mod:`~service.bodies.npz`: the formats;
* :mod:`~service.bodies.arrays`: checks of the decoded inputs (shape, rows, finiteness);
* :mod:`~service.bodies.budget`: the memory budget of bodies and their decoding (admission
  in arrival order, reservations, freed memory handed back after a burst);
* :mod:`~service.bodies.limits`: the ASGI guard (size and time caps, budget admission, API
  key of bodies) and :mod:`~service.bodies.errors`, its errors.

Every refusal is answered through :func:`service.errors.error_answer` (RFC 9457 problem+json;
under /v2 the Open Inference Protocol's ``{"error": ...}``).
"""
