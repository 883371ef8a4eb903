// NBD protocol codec: see nbd.h
