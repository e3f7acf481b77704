"""The content-addressed feature store: Zarr v3, one namespace per encoder, immutable sharded segments.

Layout under the store root (a local path or an fsspec URL)::

    zarr.json                              root group, attributes mark the format and its version
    <fingerprint>/zarr.json                one namespace per encoder identity, provenance in attributes
    <fingerprint>/segments/<segment>/      one writer's arrays, never shared with another writer:
        embedding                          rows x 256 x 64 x 64 float16, one chunk per row, sharded
        early                              rows x C x 64 x 64 float16
        plane                              rows x 3 x 256 x 256 uint8 (layout 3: the stride-4 image plane)
    <fingerprint>/commits/<segment>.json   the committed rows of that segment (key, row, sizes, digest, and
                                           where each chunk starts), and the segment's layout
    <fingerprint>/datasets/<name>.json     per-dataset manifest: image id / file name -> key, sizes
    <fingerprint>/index.npz                a cache of the commit files, used only while they are unchanged
                                           (see `pipeline.store.index`)

Why it is crash-safe and safe with several writers: a writer owns its segment and writes each batch as
whole, fresh shards; only then does it replace its commit file (atomically). Readers see exactly the rows
named in commit files, so a killed writer leaves at most unreferenced bytes behind, never a visible
partial entry, and two writers never write the same file.

One key, one entry: two writers that encode the same image at the same moment both commit it (there is
no lock to prevent it). Every reader resolves a key to the copy in the *latest* segment (segment names
are time-ordered), so all readers agree; `refine store gc` later drops the other copies. Latest-wins is
also how a damaged entry is repaired: `extract` recomputes it into a fresh, later segment.

One concept a module: the root and its file system (`root`), a namespace's entries, reads and datasets
(`namespace`), the commit file (`commit`), the index of committed entries (`index`), the segment layouts
(`layouts`: the one place that knows what a layout number means) and their shard bytes (`shards`), the
writer (`writer`), and the store commands' work (`gc`, `migrate`, `report`). The root's
marker gives the newest segment layout the store may hold: version 2 the first with segments of layout 2,
version 3 the first with layout 3. An older store is read as it is and marked by its first new segment, so
that an older refine refuses it in one line instead of misreading it.
"""

from pipeline.store.index import Entry, EntryIndex
from pipeline.store.namespace import Namespace
from pipeline.store.root import FeatureStore

__all__ = ["Entry", "EntryIndex", "FeatureStore", "Namespace"]
