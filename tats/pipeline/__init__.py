"""Stage one: offline extraction of point tracks and patch features into Zarr stores."""
