/* No program: the network policy maps of lib/policy.h, for `mesh policy status` to open the
 * pinned ones of a running (or stopped) agent and read them. */
#include "lib/policy.h"
