package dev.sessionaffinity.demo;

/** Something apps put in sessions that cannot be serialized (no Serializable). */
public final class RenderHelper {

    private final Thread owner = Thread.currentThread();

    @Override
    public String toString() {
        return "RenderHelper made on " + owner.getName();
    }
}
